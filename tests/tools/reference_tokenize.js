// Reference token ids from Hugging Face's own `tokenizers` library (its Node bindings):
//   node reference_tokenize.js TOKENIZER_JSON CORPUS_JSON
// prints, per string, {"ids", "ids_special", "decoded", "decoded_skip"} as a JSON list.
const fs = require("fs");
const { Tokenizer } = require("tokenizers");

(async () => {
  const [file, corpusFile] = process.argv.slice(2);
  const tok = Tokenizer.fromFile(file);
  const corpus = JSON.parse(fs.readFileSync(corpusFile, "utf8"));
  const out = [];
  for (const text of corpus) {
    const plain = await tok.encode(text, null, { addSpecialTokens: false });
    const special = await tok.encode(text, null, { addSpecialTokens: true });
    out.push({
      ids: plain.getIds(),
      ids_special: special.getIds(),
      decoded: await tok.decode(special.getIds(), false),
      decoded_skip: await tok.decode(special.getIds(), true),
    });
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
