// requestFromTask follows the Python client's rules: hand-written cases here, and when TRIPTYCH_TASK_VECTORS
// names a file of the Python client's TASK_KEYS and of vectors {task, request (base64 of Python's serialized
// GenerateRequest) | keys (violation keys)} (written by tests/e2e/test_node_client.py), every one of them.
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { describe, test } from "node:test";

import {
  TASK_KEYS,
  TaskError,
  channelTarget,
  generateMethod,
  parseServerTiming,
  requestFromTask,
  requestsFromJson,
} from "../src";

const violationKeys = (fn: () => unknown): string[] => {
  try {
    fn();
  } catch (error) {
    if (error instanceof TaskError) return error.violations.map((v) => v.key);
    throw error;
  }
  assert.fail("expected a TaskError");
};

describe("requestFromTask", () => {
  test("maps Runware keys to fields", () => {
    const request = requestFromTask({
      taskType: "imageInference",
      taskUUID: "t-1",
      positivePrompt: "a red fox",
      model: "tiny/sdxl",
      CFGScale: 7,
      seed: 42,
      outputFormat: "jpg",
      lora: [{ model: "tiny/lora", weight: 0.5 }],
      refiner: { model: "tiny/sdxl-refiner", startStepPercentage: 80 },
    });
    assert.equal(request.taskUuid, "t-1");
    assert.equal(request.cfgScale, 7);
    assert.equal(request.seed, "42");
    assert.equal(request.outputFormat, "OUTPUT_FORMAT_JPEG");
    assert.deepEqual(request.lora, [{ model: "tiny/lora", weight: 0.5 }]);
    assert.deepEqual(request.refiner, { model: "tiny/sdxl-refiner", startStepPercentage: 80 });
    assert.equal(request.width, undefined); // unset stays unset: the model's default size
  });

  test("names every bad key at once", () => {
    const keys = violationKeys(() =>
      requestFromTask({ CFGscale: 3, seed: -1, width: 1.5, lora: [{ model: 1 }], controlNet: [{ model: "c" }] }),
    );
    assert.deepEqual(keys, ["CFGscale", "width", "seed", "lora[0].model", "controlNet[0].guideImage"]);
  });

  test("a uint64 seed beyond 2^53 passes exactly as a bigint", () => {
    assert.equal(requestFromTask({ seed: 2n ** 64n - 1n }).seed, "18446744073709551615");
    assert.deepEqual(violationKeys(() => requestFromTask({ seed: 2n ** 64n })), ["seed"]);
  });

  test("an array of tasks prefixes each violation with its index", () => {
    assert.deepEqual(
      violationKeys(() => requestsFromJson('[{"model": "a"}, {"steps": "x"}]')),
      ["[1].steps"],
    );
    assert.deepEqual(violationKeys(() => requestsFromJson("{")), ["task"]);
  });

  test("server-timing values are read as seconds", () => {
    assert.deepEqual(parseServerTiming("encode;dur=1.5, encode-hop;dur=0.5,total;dur=276"), {
      encode: 0.0015,
      "encode-hop": 0.0005,
      total: 0.276,
    });
  });

  test("replica lists become ipv4: targets", () => {
    assert.equal(channelTarget("127.0.0.1:1,localhost:2"), "ipv4:127.0.0.1:1,127.0.0.1:2");
    assert.equal(channelTarget("dns:///gw:50051"), "dns:///gw:50051");
    assert.throws(() => channelTarget("a:1,b:2"), /IP:port/);
  });
});

const vectorsFile = process.env.TRIPTYCH_TASK_VECTORS;
describe("the Python client's vectors", { skip: vectorsFile ? false : "TRIPTYCH_TASK_VECTORS not set" }, () => {
  type Vector = { task: unknown; request?: string; keys?: string[] };
  const file = vectorsFile
    ? (JSON.parse(fs.readFileSync(vectorsFile, "utf8")) as { taskKeys: string[]; vectors: Vector[] })
    : { taskKeys: [], vectors: [] };
  const vectors = file.vectors;
  test("the same task keys", () => assert.deepEqual([...TASK_KEYS], file.taskKeys));
  const method = generateMethod();
  // Compared as decoded messages: both sides' bytes are read back with the same loader options.
  const decode = (bytes: Buffer) => method.requestDeserialize(bytes);
  vectors.forEach((vector, i) => {
    test(`vector ${i}: ${JSON.stringify(vector.task).slice(0, 80)}`, () => {
      if (vector.keys) {
        assert.deepEqual(violationKeys(() => requestFromTask(vector.task)), vector.keys);
      } else {
        const ours = method.requestSerialize(requestFromTask(vector.task));
        assert.deepEqual(decode(ours), decode(Buffer.from(vector.request ?? "", "base64")));
      }
    });
  });
});
