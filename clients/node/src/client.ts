// ImageService.Generate from Node: channel options (message limits, retries, TLS, bearer token) set as the
// Python client sets them (clients/python/triptych/client/connection.py), progress streamed, errors decoded.
import * as fs from "node:fs";
import * as path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import { TriptychError, fromServiceError } from "./errors";
import { LOADER_OPTIONS, PROTO_FILES } from "./generated/loader";
import type { ProtoGrpcType as ImageServiceProto } from "./generated/image_service";
import type { GenerateRequest } from "./generated/triptych/v1/GenerateRequest";
import type { GenerateResponse__Output } from "./generated/triptych/v1/GenerateResponse";
import type { GeneratedImage__Output } from "./generated/triptych/v1/GeneratedImage";
import type { ImageServiceClient } from "./generated/triptych/v1/ImageService";
import type { Progress__Output } from "./generated/triptych/v1/Progress";

export const DEFAULT_GATEWAY = "127.0.0.1:50051";
/** The services' default message limit (TRIPTYCH_MAX_MESSAGE_BYTES); grpc-js's own default receive limit is 4 MiB. */
export const MAX_MESSAGE_BYTES = 256 * 1024 * 1024;
// As the Python client (transport.py, streams.py): round-robin over what the target resolves to; no channel retry
// policy for the Generate stream (stream() opens it again itself on UNAVAILABLE before its first event).
const SERVICE_CONFIG = { loadBalancingConfig: [{ round_robin: {} }] };
const RETRY = { maxAttempts: 5, initialBackoffMs: 100, maxBackoffMs: 2000, backoffMultiplier: 2 };

/** TLS files (PEM). Omit `ca` to verify servers against the system's roots; give `cert` + `key` for mTLS. */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
}

export interface ClientOptions {
  /** TLS: `true` (system roots) or files; absent means plaintext, for loopback only. */
  tls?: boolean | TlsOptions;
  /** Sent as `authorization: Bearer <token>` on every call (also over plaintext on loopback). */
  authToken?: string;
  /** The name the server certificate must carry when it differs from the address. */
  serverName?: string;
  /** Send and receive limit in bytes; must match the servers' (256 MiB by default). */
  maxMessageBytes?: number;
}

export interface CallOptions {
  /** Seconds from now, or an absolute Date. */
  timeout?: number | Date;
  /** Aborting cancels the call (the gateway cancels its downstream calls too). */
  signal?: AbortSignal;
  /** Called with each progress event (stage, step, totalSteps, imageIndex, previewPng). */
  onProgress?: (progress: Progress__Output) => void;
  /**
   * Called once a call has succeeded, with its `server-timing` trailer in seconds by name: `total`, each stage
   * (`encode`, `denoise`, `refine`, `decode`), its `-hop` and `-queue`, and `gateway` (docs/decisions.md, Timing).
   */
  onServerTiming?: (timing: Record<string, number>) => void;
}

const METRIC = /^\s*([A-Za-z0-9_.-]+)\s*(?:;\s*dur\s*=\s*([0-9.eE+-]+))?/;

/** Seconds by metric name from a `server-timing` value (W3C syntax, milliseconds), e.g. "total;dur=276.0". */
export function parseServerTiming(value: string): Record<string, number> {
  const timing: Record<string, number> = {};
  for (const item of value.split(",")) {
    const match = METRIC.exec(item);
    if (match && match[2] !== undefined) timing[match[1]] = Number(match[2]) / 1e3;
  }
  return timing;
}

const readPem = (value: string | Buffer | undefined): Buffer | null =>
  value === undefined ? null : Buffer.isBuffer(value) ? value : fs.readFileSync(value);

/**
 * The gRPC target for an address: one `host:port` (or any gRPC target such as `dns:///name:port`) as is; a
 * comma-separated list of IP replicas becomes a static `ipv4:`/`ipv6:` list, balanced round-robin.
 */
export function channelTarget(address: string): string {
  if (!address.includes(",") || /^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds):/.test(address)) return address;
  const entries = address.split(",").map((entry) => entry.trim().replace(/^localhost:/, "127.0.0.1:"));
  if (entries.every((entry) => /^\d+\.\d+\.\d+\.\d+:\d+$/.test(entry))) return `ipv4:${entries.join(",")}`;
  if (entries.every((entry) => /^\[[0-9a-fA-F:.]+\]:\d+$/.test(entry))) return `ipv6:${entries.join(",")}`;
  throw new Error(
    `replica list ${JSON.stringify(address)}: list IP:port entries of one family, or give one dns:///name:port target`,
  );
}

type ImageServiceConstructor = ImageServiceProto["triptych"]["v1"]["ImageService"];
let imageServiceConstructor: ImageServiceConstructor | undefined;

function imageService(): ImageServiceConstructor {
  if (!imageServiceConstructor) {
    const definition = protoLoader.loadSync(PROTO_FILES, {
      ...LOADER_OPTIONS,
      includeDirs: [path.resolve(__dirname, "..", "..", "protos")],
    });
    const proto = grpc.loadPackageDefinition(definition) as unknown as ImageServiceProto;
    imageServiceConstructor = proto.triptych.v1.ImageService;
  }
  return imageServiceConstructor;
}

/** Generate's method definition: requestSerialize / responseDeserialize with the client's loader options. */
export function generateMethod(): ImageServiceConstructor["service"]["Generate"] {
  return imageService().service.Generate;
}

/** Calls ImageService.Generate on a gateway. */
export class ImageClient {
  readonly stub: ImageServiceClient;
  private readonly token?: string;
  private readonly maxMessageBytes: number;

  constructor(address: string = DEFAULT_GATEWAY, options: ClientOptions = {}) {
    const limit = options.maxMessageBytes ?? MAX_MESSAGE_BYTES;
    const channelOptions: grpc.ChannelOptions = {
      "grpc.max_send_message_length": limit,
      "grpc.max_receive_message_length": limit,
      "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
    };
    if (options.serverName) {
      channelOptions["grpc.ssl_target_name_override"] = options.serverName;
      channelOptions["grpc.default_authority"] = options.serverName;
    }
    let credentials = grpc.credentials.createInsecure();
    if (options.tls) {
      const files = options.tls === true ? {} : options.tls;
      if ((files.cert === undefined) !== (files.key === undefined)) {
        throw new Error("a client certificate needs both its certificate file and its key file");
      }
      credentials = grpc.credentials.createSsl(readPem(files.ca), readPem(files.key), readPem(files.cert));
    }
    const Service = imageService();
    this.stub = new Service(channelTarget(address), credentials, channelOptions);
    this.token = options.authToken;
    this.maxMessageBytes = limit;
  }

  /**
   * Progress events and images as they come, as an async iterable; a failed call throws TriptychError (field
   * violations decoded). A progress `step` counts model calls, not steps: second-order schedulers (Heun, DPM2)
   * make 2N-1 calls for N steps and PNDM N+1. A call that fails UNAVAILABLE before its first event (a replica
   * gone or draining) is opened again, on the next replica, up to 5 attempts within the deadline: every
   * Triptych request is deterministic, so another replica gives the same answer. So is one that ends CANCELLED
   * before its first event without this caller aborting: a stopping gRPC server cancels the calls it has not yet
   * handed to a handler (grpc/grpc#41785), so nothing ran for them.
   */
  async *stream(request: GenerateRequest, options: CallOptions = {}): AsyncGenerator<GenerateResponse__Output> {
    const deadline =
      options.timeout === undefined
        ? undefined
        : options.timeout instanceof Date
          ? options.timeout
          : new Date(Date.now() + options.timeout * 1000);
    // What this channel can receive: the gateway refuses up front a request whose image could exceed it.
    const fields = request as Record<string, unknown>;
    if (fields.maxResponseBytes === undefined && fields.max_response_bytes === undefined) {
      request = { ...request, maxResponseBytes: this.maxMessageBytes } as GenerateRequest;
    }
    let backoff = RETRY.initialBackoffMs;
    for (let attempt = 1; ; attempt++) {
      let received = false;
      try {
        for await (const event of this.attempt(request, deadline, options)) {
          received = true;
          yield event;
        }
        return;
      } catch (error) {
        const retry =
          error instanceof TriptychError &&
          (error.code === grpc.status.UNAVAILABLE || error.code === grpc.status.CANCELLED) &&
          !received &&
          attempt < RETRY.maxAttempts &&
          !options.signal?.aborted;
        const pause = Math.random() * backoff; // jittered, as gRPC's retry policy
        if (!retry || (deadline !== undefined && Date.now() + pause >= deadline.getTime())) throw error;
        await new Promise((resolve) => setTimeout(resolve, pause));
        backoff = Math.min(backoff * RETRY.backoffMultiplier, RETRY.maxBackoffMs);
      }
    }
  }

  private async *attempt(
    request: GenerateRequest,
    deadline: Date | undefined,
    options: CallOptions,
  ): AsyncGenerator<GenerateResponse__Output> {
    const signal = options.signal;
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set("authorization", `Bearer ${this.token}`);
    const call = this.stub.generate(request, metadata, deadline ? { deadline } : {});
    let trailer: Record<string, number> | undefined;
    let ended = false;
    call.on("status", (status: grpc.StatusObject) => {
      ended = true;
      const value = status.metadata.get("server-timing")[0];
      if (status.code === grpc.status.OK && typeof value === "string") trailer = parseServerTiming(value);
    });
    const abort = () => call.cancel();
    if (signal?.aborted) abort();
    signal?.addEventListener("abort", abort, { once: true });
    try {
      for await (const event of call as AsyncIterable<GenerateResponse__Output>) yield event;
      if (options.onServerTiming) {
        // The status (with the trailer) may come just after the last message.
        if (!ended) await new Promise((resolve) => call.once("status", resolve));
        if (trailer !== undefined) options.onServerTiming(trailer);
      }
    } catch (error) {
      if (error && typeof error === "object" && "code" in error && "metadata" in error) {
        throw fromServiceError(error as grpc.ServiceError);
      }
      throw error;
    } finally {
      signal?.removeEventListener("abort", abort);
      call.cancel(); // a no-op once the call has ended; ends it when the caller stopped iterating early
    }
  }

  /** All images of a request, in index order; progress goes to `options.onProgress`. */
  async generate(request: GenerateRequest, options: CallOptions = {}): Promise<GeneratedImage__Output[]> {
    const images: GeneratedImage__Output[] = [];
    for await (const event of this.stream(request, options)) {
      if (event.image) images.push(event.image);
      else if (event.progress) options.onProgress?.(event.progress);
    }
    return images.sort((a, b) => a.index - b.index);
  }

  close(): void {
    this.stub.close();
  }
}
