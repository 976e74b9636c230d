// Parses an AsyncAPI document with the AsyncAPI parser, local `$ref`s resolved against the
// document's directory, and prints every diagnostic. Exits 1 when any diagnostic is an error,
// 2 when the file cannot be read, 0 otherwise.
//
//   node tools/asyncapi/validate.mjs [schemas/asyncapi.yaml]
//
// The parser converts the Avro payloads of an AsyncAPI 3 document but does not validate them
// (it does so only for 2.x documents), so each one also goes through the Avro schema parser's
// own validation (avsc) here and a failure is an error like any other.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { AvroSchemaParser } from "@asyncapi/avro-schema-parser";
import { DiagnosticSeverity, fromFile, Parser } from "@asyncapi/parser";

const here = fileURLToPath(new URL(".", import.meta.url));
const file = resolve(process.argv[2] ?? resolve(here, "../../schemas/asyncapi.yaml"));

try {
  readFileSync(file);
} catch (err) {
  console.error(`${file}: ${err.message}`);
  process.exit(2);
}

const avro = AvroSchemaParser();
const avroErrors = [];
const parser = new Parser();
parser.registerSchemaParser({
  getMimeTypes: avro.getMimeTypes,
  validate: avro.validate,
  async parse(input) {
    for (const problem of await avro.validate(input)) {
      avroErrors.push({ code: "avro-schema", path: input.path, message: problem.message });
    }
    return avro.parse(input);
  },
});
const { document, diagnostics } = await fromFile(parser, file).parse();

const SEVERITY = {
  [DiagnosticSeverity.Error]: "error",
  [DiagnosticSeverity.Warning]: "warning",
  [DiagnosticSeverity.Information]: "info",
  [DiagnosticSeverity.Hint]: "hint",
};
const errors = [
  ...diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error),
  ...avroErrors,
];
for (const d of diagnostics) {
  const line = d.range ? `:${d.range.start.line + 1}` : "";
  console.log(`${SEVERITY[d.severity]} ${d.code} at ${d.path.join("/") || "(document)"}${line}: ${d.message}`);
}
for (const e of avroErrors) {
  console.log(`error ${e.code} at ${e.path.join("/")}: ${e.message}`);
}
if (errors.length || document === undefined) {
  console.log(`${file}: ${errors.length} error(s); not a valid AsyncAPI document`);
  process.exit(1);
}
const counts = [
  `${document.channels().length} channels`,
  `${document.operations().length} operations`,
  `${document.messages().length} messages`,
];
console.log(`${file}: valid AsyncAPI ${document.version()} (${counts.join(", ")})`);
