// Against a gateway with TLS and bearer tokens (TRIPTYCH_SECURE_GATEWAY, its CA in TRIPTYCH_CA_FILE, an accepted
// token in TRIPTYCH_TOKEN), started by tests/e2e/test_node_client.py. Skipped without TRIPTYCH_SECURE_GATEWAY.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { type ClientOptions, ImageClient, TriptychError, requestFromTask } from "../src";

const gateway = process.env.TRIPTYCH_SECURE_GATEWAY;
const request = requestFromTask({ positivePrompt: "a red fox", model: "tiny/sd15", width: 64, height: 64, steps: 1 });

async function codeOf(options: ClientOptions): Promise<grpc.status | "OK"> {
  const client = new ImageClient(gateway, options);
  try {
    const images = await client.generate(request, { timeout: 60 });
    assert.equal(images.length, 1);
    return "OK";
  } catch (error) {
    assert.ok(error instanceof TriptychError, String(error));
    return error.code;
  } finally {
    client.close();
  }
}

describe("TLS and bearer tokens", { skip: gateway ? false : "TRIPTYCH_SECURE_GATEWAY not set" }, () => {
  const ca = process.env.TRIPTYCH_CA_FILE ?? "";
  const token = process.env.TRIPTYCH_TOKEN ?? "";

  test("TLS with the CA and a token", async () => {
    assert.equal(await codeOf({ tls: { ca }, authToken: token }), "OK");
  });

  test("without the token: UNAUTHENTICATED", async () => {
    assert.equal(await codeOf({ tls: { ca } }), grpc.status.UNAUTHENTICATED);
    assert.equal(await codeOf({ tls: { ca }, authToken: "wrong" }), grpc.status.UNAUTHENTICATED);
  });

  test("plaintext to a TLS gateway, or a certificate for another name: UNAVAILABLE", async () => {
    assert.equal(await codeOf({ authToken: token }), grpc.status.UNAVAILABLE);
    assert.equal(await codeOf({ tls: { ca }, authToken: token, serverName: "elsewhere.example" }), grpc.status.UNAVAILABLE);
    assert.equal(await codeOf({ tls: { ca }, authToken: token, serverName: "localhost" }), "OK");
  });
});
