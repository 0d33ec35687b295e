// Triptych's error contract: a failed call carries a google.rpc.Status in the `grpc-status-details-bin`
// trailer, whose details hold a google.rpc.BadRequest with one FieldViolation per bad field. Field paths name
// the proto fields of the request the caller sent, in snake_case (`width`, `lora[0].weight`,
// `control_net[1].end_step`), not the Runware keys.
import * as path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protobuf from "protobufjs";

/** One bad field of a request, as the server named it. */
export interface FieldViolation {
  /** Proto field path in snake_case, e.g. `lora[0].weight`. */
  field: string;
  /** What is wrong and what to do, e.g. "must be a multiple of 8 (got 500)". */
  description: string;
}

/** A failed call: the gRPC status code, its message and the decoded field violations (if any). */
export class TriptychError extends Error {
  readonly code: grpc.status;
  readonly codeName: string;
  readonly details: string;
  readonly fieldViolations: FieldViolation[];
  readonly metadata?: grpc.Metadata;

  constructor(code: grpc.status, details: string, fieldViolations: FieldViolation[] = [], metadata?: grpc.Metadata) {
    const codeName = grpc.status[code] ?? String(code);
    super([`${codeName}: ${details}`, ...fieldViolations.map((v) => `  field ${v.field}: ${v.description}`)].join("\n"));
    this.name = "TriptychError";
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.fieldViolations = fieldViolations;
    this.metadata = metadata;
  }
}

let schemas: { status: protobuf.Type; badRequest: protobuf.Type } | undefined;

function rpcSchemas(): { status: protobuf.Type; badRequest: protobuf.Type } {
  if (!schemas) {
    // The vendored google/rpc protos (protos/google/rpc); google/protobuf/* are built into protobufjs.
    const root = new protobuf.Root();
    const protos = path.resolve(__dirname, "..", "..", "protos");
    root.resolvePath = (_origin, target) => (target.startsWith("google/protobuf/") ? target : path.join(protos, target));
    root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
    schemas = { status: root.lookupType("google.rpc.Status"), badRequest: root.lookupType("google.rpc.BadRequest") };
  }
  return schemas;
}

/** The BadRequest field violations in a `grpc-status-details-bin` value (a serialized google.rpc.Status). */
export function decodeFieldViolations(statusDetails: Buffer | Uint8Array): FieldViolation[] {
  const { status, badRequest } = rpcSchemas();
  const decoded = status.decode(statusDetails) as unknown as { details?: { type_url: string; value: Uint8Array }[] };
  const found: FieldViolation[] = [];
  for (const any of decoded.details ?? []) {
    if (any.type_url.endsWith("/google.rpc.BadRequest")) {
      const bad = badRequest.decode(any.value) as unknown as { field_violations?: FieldViolation[] };
      for (const v of bad.field_violations ?? []) found.push({ field: v.field ?? "", description: v.description ?? "" });
    }
  }
  return found;
}

/** A grpc-js ServiceError as a TriptychError, with the trailer's field violations decoded. */
export function fromServiceError(error: grpc.ServiceError): TriptychError {
  const raw = error.metadata?.get("grpc-status-details-bin")[0];
  let violations: FieldViolation[] = [];
  if (raw !== undefined) {
    try {
      violations = decodeFieldViolations(typeof raw === "string" ? Buffer.from(raw, "base64") : raw);
    } catch {
      violations = []; // a trailer that does not parse leaves the code and message, which still say what failed
    }
  }
  return new TriptychError(error.code, error.details, violations, error.metadata);
}
