// Against a running gateway (TRIPTYCH_GATEWAY): the task in TRIPTYCH_TASK (JSON) is generated and its images
// written to TRIPTYCH_OUT as node-<index>.png, for tests/e2e/test_node_client.py to compare with the Python
// client's, pixel for pixel. Skipped without TRIPTYCH_GATEWAY.
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { ImageClient, type Progress, TriptychError, requestFromTask } from "../src";

const gateway = process.env.TRIPTYCH_GATEWAY;

const failure = async (promise: Promise<unknown>): Promise<TriptychError> => {
  try {
    await promise;
  } catch (error) {
    assert.ok(error instanceof TriptychError, String(error));
    return error;
  }
  assert.fail("expected the call to fail");
};

describe("ImageClient against the real services", { skip: gateway ? false : "TRIPTYCH_GATEWAY not set" }, () => {
  test("streams progress, then the images of the task", async () => {
    const task = JSON.parse(process.env.TRIPTYCH_TASK ?? '{"positivePrompt": "a red fox", "model": "tiny/sd15"}');
    const client = new ImageClient(gateway);
    const progress: Progress[] = [];
    try {
      let timing: Record<string, number> = {};
      const images = await client.generate(requestFromTask(task), {
        onProgress: (p) => progress.push(p),
        onServerTiming: (t) => (timing = t),
        timeout: 120,
      });
      for (const name of ["encode", "denoise", "decode", "gateway", "total"]) assert.ok(timing[name] >= 0, name);
      assert.ok(timing.total >= timing.denoise);
      assert.equal(images.length, task.numberResults ?? 1);
      const stages = new Set(progress.map((p) => p.stage));
      assert.deepEqual([...stages].sort(), ["decode", "denoise", "encode"]);
      const lastDenoise = progress.filter((p) => p.stage === "denoise").at(-1);
      assert.ok(lastDenoise && lastDenoise.step === lastDenoise.totalSteps && lastDenoise.step > 0);
      for (const image of images) {
        assert.equal(image.image?.mimeType, "image/png");
        assert.equal(image.seed, String(BigInt(task.seed ?? image.seed) + BigInt(image.index))); // uint64 as a string
        if (process.env.TRIPTYCH_OUT) {
          fs.writeFileSync(path.join(process.env.TRIPTYCH_OUT, `node-${image.index}.png`), image.image?.data ?? "");
        }
      }
    } finally {
      client.close();
    }
  });

  test("a bad request's field violations are decoded from grpc-status-details-bin", async () => {
    const client = new ImageClient(`${gateway},${gateway}`); // a replica list: an ipv4: target
    try {
      const error = await failure(client.generate(requestFromTask({ model: "tiny/sd15", width: 500, steps: 0 })));
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.deepEqual(error.fieldViolations.map((v) => v.field).sort(), ["steps", "width"]);
      assert.match(error.fieldViolations.find((v) => v.field === "width")?.description ?? "", /multiple of 8/);
      const missing = await failure(client.generate(requestFromTask({ model: "tiny/no-such-model" })));
      assert.equal(missing.code, grpc.status.NOT_FOUND);
    } finally {
      client.close();
    }
  });

  test("aborting the signal cancels the call", async () => {
    const client = new ImageClient(gateway);
    const controller = new AbortController();
    try {
      const request = requestFromTask({ positivePrompt: "x", model: "tiny/sd15", steps: 50 });
      const error = await failure(client.generate(request, { signal: controller.signal, onProgress: () => controller.abort() }));
      assert.equal(error.code, grpc.status.CANCELLED);
    } finally {
      client.close();
    }
  });

  test("a message limit below the image's possible size is refused up front, before any work", async () => {
    // The client sends its receive limit (maxResponseBytes); the gateway refuses what could exceed it, so a large
    // image never fails after the work is done.
    const client = new ImageClient(gateway, { maxMessageBytes: 1024 });
    try {
      const error = await failure(client.generate(requestFromTask({ positivePrompt: "x", model: "tiny/sd15", steps: 1 })));
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.deepEqual(
        error.fieldViolations.map((v) => v.field),
        ["max_response_bytes"],
      );
    } finally {
      client.close();
    }
  });
});
