// Example: one Runware imageInference task (a JSON file, or a prompt) to PNG files, with progress on stderr.
//   npm run build && node dist/examples/generate.js --gateway 127.0.0.1:50051 --task task.json --out out
//   node dist/examples/generate.js "a red fox" --model tiny/sd15 --seed 7
// Options: --token TOKEN (bearer), --ca FILE (TLS, verify against FILE), --tls (TLS, system roots).
import * as fs from "node:fs";
import * as path from "node:path";
import { parseArgs } from "node:util";

import { ImageClient, TaskError, TriptychError, requestsFromJson } from "../src";

async function main(): Promise<number> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      gateway: { type: "string", default: process.env.TRIPTYCH_GATEWAY ?? "127.0.0.1:50051" },
      task: { type: "string" },
      model: { type: "string", default: "tiny/sd15" },
      seed: { type: "string" },
      out: { type: "string", default: "out" },
      token: { type: "string" },
      ca: { type: "string" },
      tls: { type: "boolean", default: false },
    },
  });
  const text = values.task
    ? fs.readFileSync(values.task, "utf8")
    : JSON.stringify({
        positivePrompt: positionals.join(" ") || "a red fox",
        model: values.model,
        ...(values.seed ? { seed: Number(values.seed) } : {}),
      });
  const baseDir = values.task ? path.dirname(values.task) : undefined;
  const client = new ImageClient(values.gateway, {
    authToken: values.token,
    tls: values.ca ? { ca: values.ca } : values.tls,
  });
  try {
    const requests = requestsFromJson(text, baseDir);
    for (const [t, request] of requests.entries()) {
      const images = await client.generate(request, {
        onProgress: (p) => process.stderr.write(`\r${p.stage} ${p.step}/${p.totalSteps} (image ${p.imageIndex})   `),
      });
      process.stderr.write("\n");
      for (const image of images) {
        const suffix = image.image?.mimeType.split("/")[1] ?? "bin";
        const file = requests.length > 1 ? `${values.out}-${t + 1}-${image.index + 1}` : `${values.out}-${image.index + 1}`;
        fs.writeFileSync(`${file}.${suffix === "jpeg" ? "jpg" : suffix}`, image.image?.data ?? Buffer.alloc(0));
        console.log(`${file}.${suffix === "jpeg" ? "jpg" : suffix} seed ${image.seed}`);
      }
    }
    return 0;
  } catch (error) {
    if (error instanceof TaskError || error instanceof TriptychError) {
      console.error(error.message);
      return 1;
    }
    throw error;
  } finally {
    client.close();
  }
}

main().then((code) => process.exit(code));
