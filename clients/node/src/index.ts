// Node client for Triptych: ImageService.Generate over gRPC, Runware task JSON -> GenerateRequest, errors with
// their field violations. The typed gRPC layer (src/generated) is built from ../../protos by `npm run build`.
export {
  type CallOptions,
  type ClientOptions,
  DEFAULT_GATEWAY,
  ImageClient,
  MAX_MESSAGE_BYTES,
  type TlsOptions,
  channelTarget,
  generateMethod,
  parseServerTiming,
} from "./client";
export { type FieldViolation, TriptychError, decodeFieldViolations, fromServiceError } from "./errors";
export { LOADER_OPTIONS, PROTO_FILES } from "./generated/loader";
export { TASK_KEYS, TaskError, type TaskViolation, readImageBytes, requestFromTask, requestsFromJson } from "./task";
export type { GenerateRequest } from "./generated/triptych/v1/GenerateRequest";
export type { GenerateResponse__Output as GenerateResponse } from "./generated/triptych/v1/GenerateResponse";
export type { GeneratedImage__Output as GeneratedImage } from "./generated/triptych/v1/GeneratedImage";
export type { Progress__Output as Progress } from "./generated/triptych/v1/Progress";
