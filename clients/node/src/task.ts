// Runware `imageInference` task JSON -> triptych.v1.GenerateRequest, with the Python client's rules
// (clients/python/triptych/client/task.py): the same keys, ranges and violation paths. Keys are camelCase as
// Runware sends them; a key not in TASK_KEYS is an error naming it, never ignored.
import * as fs from "node:fs";
import * as path from "node:path";

import { generateMethod } from "./client";
import type { ControlNetUnit } from "./generated/triptych/v1/ControlNetUnit";
import type { GenerateRequest } from "./generated/triptych/v1/GenerateRequest";
import type { Refiner } from "./generated/triptych/v1/Refiner";

const BASE_KEYS = [
  "taskType",
  "taskUUID",
  "positivePrompt",
  "negativePrompt",
  "model",
  "width",
  "height",
  "steps",
  "CFGScale",
  "scheduler",
  "seed",
  "clipSkip",
  "vae",
  "numberResults",
  "outputFormat",
  "outputQuality",
  "lora",
  "embeddings",
  "controlNet",
  "refiner",
  "promptWeighting",
] as const;

// Keys of GenerateRequest fields newer than the first protos: each is accepted only where this build's protos
// have its field, as the Python client built from the same protos does.
const GATED_KEYS: Record<string, string> = { maxSequenceLength: "maxSequenceLength" };
const REQUEST_FIELDS = new Set(
  ((generateMethod().requestType.type as { field?: { name: string }[] }).field ?? []).map((f) => f.name),
);

/** The Runware keys a task may have, in the Python client's order (TASK_KEYS in task.py). */
export const TASK_KEYS: readonly string[] = [
  ...BASE_KEYS,
  ...Object.keys(GATED_KEYS).filter((key) => REQUEST_FIELDS.has(GATED_KEYS[key])),
];

const FORMATS: Record<string, string> = {
  PNG: "OUTPUT_FORMAT_PNG",
  JPG: "OUTPUT_FORMAT_JPEG",
  JPEG: "OUTPUT_FORMAT_JPEG",
  WEBP: "OUTPUT_FORMAT_WEBP",
};
// Runware's promptWeighting values (any case). "sdEmbeds" is A1111 syntax; "compel" is not built.
const WEIGHTINGS: Record<string, string> = { sdembeds: "PROMPT_WEIGHTING_A1111", a1111: "PROMPT_WEIGHTING_A1111" };
const MODES: Record<string, string> = {
  balanced: "CONTROL_MODE_BALANCED",
  prompt: "CONTROL_MODE_PROMPT",
  controlnet: "CONTROL_MODE_CONTROLNET",
};
const UINT32_MAX = 2 ** 32 - 1;
const UINT64_MAX = 2n ** 64n - 1n;
const CONTROL_KEYS = [
  "model",
  "guideImage",
  "weight",
  "startStep",
  "startStepPercentage",
  "endStep",
  "endStepPercentage",
  "controlMode",
] as const;

/** One offending key of a task and why, e.g. `{ key: "lora[0].weight", reason: "must be a finite number ..." }`. */
export interface TaskViolation {
  key: string;
  reason: string;
}

/** A task that cannot become a request: every offending key, with a reason. */
export class TaskError extends Error {
  readonly violations: TaskViolation[];

  constructor(violations: TaskViolation[]) {
    super(violations.map((v) => `${v.key}: ${v.reason}`).join("; "));
    this.name = "TaskError";
    this.violations = violations;
  }
}

const show = (value: unknown): string => {
  try {
    return typeof value === "bigint" ? value.toString() : (JSON.stringify(value) ?? String(value));
  } catch {
    return String(value);
  }
};

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value) && !Buffer.isBuffer(value);

/** Reads typed values out of one JSON object, collecting violations instead of stopping at the first. */
class Reader {
  readonly obj: Record<string, unknown>;

  constructor(
    obj: unknown,
    readonly path: string,
    readonly violations: TaskViolation[],
    allowed: readonly string[],
  ) {
    if (!isObject(obj)) {
      violations.push({ key: path || "task", reason: "must be a JSON object" });
      obj = {};
    }
    this.obj = obj as Record<string, unknown>;
    for (const key of Object.keys(this.obj)) {
      if (!allowed.includes(key)) this.bad(key, `unknown key (accepted: ${allowed.join(", ")})`);
    }
  }

  key(name: string): string {
    return this.path ? `${this.path}.${name}` : name;
  }

  bad(name: string, reason: string): void {
    this.violations.push({ key: this.key(name), reason });
  }

  // null means absent, as in the Python client (JSON null -> None).
  get(name: string): unknown {
    const value = this.obj[name];
    return value === null ? undefined : value;
  }

  string(name: string): string | undefined {
    const value = this.get(name);
    if (value !== undefined && typeof value !== "string") {
      this.bad(name, `must be a string (got ${show(value)})`);
      return undefined;
    }
    return value;
  }

  /** An integer in [low, high]; a bigint is accepted too (a JSON number past 2^53 has lost its last digits). */
  integer(name: string, low: bigint, high: bigint): bigint | undefined {
    const value = this.get(name);
    if (value === undefined) return undefined;
    if (!(typeof value === "bigint" || (typeof value === "number" && Number.isInteger(value)))) {
      this.bad(name, `must be an integer (got ${show(value)})`);
      return undefined;
    }
    const integer = BigInt(value);
    if (integer < low || integer > high) {
      this.bad(name, `must be between ${low} and ${high} (got ${integer})`);
      return undefined;
    }
    return integer;
  }

  number(name: string): number | undefined {
    const value = this.get(name);
    if (value === undefined) return undefined;
    const number = typeof value === "number" ? value : typeof value === "bigint" ? Number(value) : NaN;
    if (!Number.isFinite(number)) {
      this.bad(name, `must be a finite number (got ${show(value).slice(0, 40)})`);
      return undefined;
    }
    return number;
  }

  items(name: string): unknown[] {
    const value = this.get(name);
    if (value === undefined) return [];
    if (!Array.isArray(value)) {
      this.bad(name, "must be a JSON array");
      return [];
    }
    return value;
  }
}

const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;

function strictBase64(text: string): Buffer {
  if (!BASE64.test(text) || text.length % 4 !== 0) throw new Error("not base64");
  return Buffer.from(text, "base64");
}

/** A guide image given as a data URI, plain base64 or a local file path. URLs are refused (no network). */
export function readImageBytes(value: string, baseDir?: string): Buffer {
  if (value.startsWith("http://") || value.startsWith("https://")) {
    throw new Error("URLs are not fetched (there is no network); give a data URI, base64 or a local path");
  }
  if (value.startsWith("data:")) {
    const comma = value.indexOf(",");
    return strictBase64(comma < 0 ? "" : value.slice(comma + 1));
  }
  const file = baseDir === undefined || path.isAbsolute(value) ? value : path.join(baseDir, value);
  let isFile = false;
  try {
    isFile = value !== "" && value.length < 4096 && fs.statSync(file).isFile();
  } catch {
    isFile = false; // absent, or a name too long to be a file: try base64
  }
  if (isFile) {
    try {
      return fs.readFileSync(file);
    } catch (error) {
      throw new Error(`cannot read ${file}: ${(error as Error).message}`);
    }
  }
  try {
    return strictBase64(value);
  } catch {
    throw new Error("neither a readable file, a data URI nor base64");
  }
}

function startEnd(sub: Reader, message: ControlNetUnit | Refiner, which: "start" | "end"): void {
  const step = sub.integer(`${which}Step`, 0n, BigInt(UINT32_MAX));
  const percentage = sub.number(`${which}StepPercentage`);
  const target = message as Record<string, unknown>;
  if (step !== undefined && percentage !== undefined) {
    sub.bad(`${which}Step`, `give ${which}Step or ${which}StepPercentage, not both`);
  } else if (step !== undefined) {
    target[`${which}Step`] = Number(step);
  } else if (percentage !== undefined) {
    target[`${which}StepPercentage`] = percentage;
  }
}

function controlUnit(item: unknown, at: string, violations: TaskViolation[], baseDir?: string): ControlNetUnit {
  const sub = new Reader(item, at, violations, CONTROL_KEYS);
  const unit: ControlNetUnit = { model: sub.string("model") ?? "" };
  const guide = sub.string("guideImage");
  if (guide === undefined) {
    sub.bad("guideImage", "required");
  } else {
    try {
      unit.guideImage = readImageBytes(guide, baseDir);
    } catch (error) {
      sub.bad("guideImage", (error as Error).message);
    }
  }
  const weight = sub.number("weight");
  if (weight !== undefined) unit.weight = weight;
  startEnd(sub, unit, "start");
  startEnd(sub, unit, "end");
  const mode = sub.string("controlMode");
  if (mode !== undefined) {
    if (!(mode.toLowerCase() in MODES)) {
      sub.bad("controlMode", `must be balanced, prompt or controlnet (got '${mode}')`);
    } else {
      unit.controlMode = MODES[mode.toLowerCase()] as ControlNetUnit["controlMode"];
    }
  }
  return unit;
}

/**
 * Builds a GenerateRequest from one Runware imageInference task (a parsed JSON object); throws TaskError
 * listing every bad key. `baseDir` resolves relative guide-image paths.
 */
export function requestFromTask(task: unknown, baseDir?: string): GenerateRequest {
  const violations: TaskViolation[] = [];
  const r = new Reader(task, "", violations, TASK_KEYS);
  const request: GenerateRequest = {};
  const taskType = r.string("taskType");
  if (taskType !== undefined && taskType !== "imageInference") {
    r.bad("taskType", `only 'imageInference' is supported (got '${taskType}')`);
  }
  const strings = [
    ["taskUUID", "taskUuid"],
    ["positivePrompt", "positivePrompt"],
    ["negativePrompt", "negativePrompt"],
    ["model", "model"],
    ["scheduler", "scheduler"],
    ["vae", "vae"],
  ] as const;
  for (const [key, field] of strings) {
    const value = r.string(key);
    if (value !== undefined) request[field] = value;
  }
  const integers = [
    ["width", "width"],
    ["height", "height"],
    ["steps", "steps"],
    ["clipSkip", "clipSkip"],
    ["numberResults", "numberResults"],
    ["outputQuality", "outputQuality"],
  ] as const;
  for (const [key, field] of integers) {
    const value = r.integer(key, 0n, BigInt(UINT32_MAX));
    if (value !== undefined) request[field] = Number(value);
  }
  const seed = r.integer("seed", 0n, UINT64_MAX);
  if (seed !== undefined) request.seed = seed.toString(); // a decimal string: exact for any uint64
  const maxSequenceLength = TASK_KEYS.includes("maxSequenceLength")
    ? r.integer("maxSequenceLength", 0n, BigInt(UINT32_MAX))
    : undefined;
  if (maxSequenceLength !== undefined) {
    (request as Record<string, unknown>).maxSequenceLength = Number(maxSequenceLength);
  }
  const cfg = r.number("CFGScale");
  if (cfg !== undefined) request.cfgScale = cfg;
  const weighting = r.string("promptWeighting");
  if (weighting !== undefined) {
    if (weighting.toLowerCase() === "compel") {
      r.bad("promptWeighting", "'compel' syntax is not supported; use 'sdEmbeds' (A1111 syntax) or omit the key");
    } else if (!(weighting.toLowerCase() in WEIGHTINGS)) {
      r.bad("promptWeighting", `must be 'sdEmbeds' (A1111 syntax) or absent (literal) (got '${weighting}')`);
    } else {
      request.promptWeighting = WEIGHTINGS[weighting.toLowerCase()] as GenerateRequest["promptWeighting"];
    }
  }
  const format = r.string("outputFormat");
  if (format !== undefined) {
    if (!(format.toUpperCase() in FORMATS)) {
      r.bad("outputFormat", `must be PNG, JPG or WEBP (got '${format}')`);
    } else {
      request.outputFormat = FORMATS[format.toUpperCase()] as GenerateRequest["outputFormat"];
    }
  }
  for (const key of ["lora", "embeddings"] as const) {
    const entries: { model: string; weight?: number }[] = [];
    r.items(key).forEach((item, i) => {
      const sub = new Reader(item, `${key}[${i}]`, violations, ["model", "weight"]);
      const entry: { model: string; weight?: number } = { model: sub.string("model") ?? "" };
      const weight = sub.number("weight");
      if (weight !== undefined) entry.weight = weight;
      entries.push(entry);
    });
    if (entries.length) request[key] = entries;
  }
  const units = r.items("controlNet").map((item, i) => controlUnit(item, `controlNet[${i}]`, violations, baseDir));
  if (units.length) request.controlNet = units;
  if (r.get("refiner") !== undefined) {
    const sub = new Reader(r.get("refiner"), "refiner", violations, ["model", "startStep", "startStepPercentage"]);
    const refiner: Refiner = { model: sub.string("model") ?? "" };
    startEnd(sub, refiner, "start");
    request.refiner = refiner;
  }
  if (violations.length) throw new TaskError(violations);
  return request;
}

/** One task object, or an array of them as Runware's API sends (answered in order), from JSON text. */
export function requestsFromJson(text: string, baseDir?: string): GenerateRequest[] {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (error) {
    throw new TaskError([{ key: "task", reason: `not valid JSON: ${(error as Error).message}` }]);
  }
  const tasks = Array.isArray(data) ? data : [data];
  const requests: GenerateRequest[] = [];
  const violations: TaskViolation[] = [];
  tasks.forEach((task, i) => {
    try {
      requests.push(requestFromTask(task, baseDir));
    } catch (error) {
      if (!(error instanceof TaskError)) throw error;
      const prefix = Array.isArray(data) ? `[${i}].` : "";
      violations.push(...error.violations.map((v) => ({ key: prefix + v.key, reason: v.reason })));
    }
  });
  if (violations.length) throw new TaskError(violations);
  return requests;
}
