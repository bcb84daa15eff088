// Drive Continue's model layer (@continuedev/openai-adapters, the library its CLI and IDE extensions call
// models through) headless: one autocomplete-style completion with a suffix, and one embedding.
//
// Usage: node continue_adapters.mjs '{"apiBase": ".../v1/", "apiKey": "...", "model": "m"}'
// Prints one JSON line: {"completion": "...", "embeddings": [[...], ...]}; exits 1 with the error otherwise.
// ESM resolves packages from the script's own directory up (NODE_PATH does not apply), so the harness runs a
// copy of this file placed in the npm prefix.
import { constructLlmApi } from "@continuedev/openai-adapters";

const { apiBase, apiKey, model, prompt = "def hello(", suffix = "\n    return name\n" } = JSON.parse(process.argv[2]);
const api = constructLlmApi({ provider: "openai", apiBase, apiKey });

try {
  let completion = "";
  // Streamed legacy completions with `suffix`: POST {apiBase}completions (fill-in-the-middle).
  for await (const chunk of api.completionStream({ model, prompt, suffix, max_tokens: 16, stream: true },
                                                 AbortSignal.timeout(60_000))) {
    completion += chunk.choices?.[0]?.text ?? "";
  }
  // encoding_format "float" spelled out: the openai SDK inside asks for "base64" by default and decodes the
  // answer as such, and llama.cpp's server ignores the field and answers floats (garbage vectors result).
  const embedded = await api.embed({ model, input: ["hello world", "cube"], encoding_format: "float" });
  const embeddings = embedded.data.map((item) => item.embedding);
  console.log(JSON.stringify({ completion, embeddings }));
} catch (error) {
  console.error(`continue adapters failed: ${error?.stack ?? error}`);
  process.exit(1);
}
