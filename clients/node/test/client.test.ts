// The client without a server: an address where nothing listens fails UNAVAILABLE once its attempts are spent.
import assert from "node:assert/strict";
import * as net from "node:net";
import { test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { ImageClient, TriptychError } from "../src";

async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

test("UNAVAILABLE before any event is retried, then thrown as a TriptychError", async () => {
  const client = new ImageClient(`127.0.0.1:${await closedPort()}`);
  const started = Date.now();
  try {
    await assert.rejects(client.generate({ model: "tiny/sd15" }, { timeout: 30 }), (error: unknown) => {
      assert.ok(error instanceof TriptychError);
      assert.equal(error.code, grpc.status.UNAVAILABLE);
      return true;
    });
  } finally {
    client.close();
  }
  assert.ok(Date.now() - started < 10_000);
});

test("an aborted signal ends the call at once", async () => {
  const client = new ImageClient(`127.0.0.1:${await closedPort()}`);
  const controller = new AbortController();
  controller.abort();
  try {
    await assert.rejects(client.generate({ model: "tiny/sd15" }, { signal: controller.signal }), (error: unknown) => {
      assert.ok(error instanceof TriptychError);
      assert.equal(error.code, grpc.status.CANCELLED);
      return true;
    });
  } finally {
    client.close();
  }
});
