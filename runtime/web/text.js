/**
 * Generated token ids -> text pieces, incrementally, with stop strings (reft_edge/runtime/text.py):
 * a piece never ends inside a multi-byte character, and text that may begin a stop string is
 * held back until it completes it (and is dropped) or cannot anymore.
 *
 * @example
 *   const row = new TextRow(tokenizer, ["\n\n"]);
 *   const pieces = [row.push(72), row.push(101), row.finish("length")];
 *   pieces.join("") === row.text;
 */
export class TextRow {
  /** @param {{decode: (ids: number[], options?: object) => string}} tokenizer @param {string[]} [stop] */
  constructor(tokenizer, stop = []) {
    this.tokenizer = tokenizer;
    this.stop = stop.filter((s) => s);
    this.pieces = [];
    this.pending = "";
    this.decodedLength = 0; // characters of the decoded answer already passed on
    /** @type {number[]} */ this.tokenIds = [];
    /** @type {string|null} eos | stop | length */ this.finishReason = null;
  }

  get finished() { return this.finishReason !== null; }

  get text() { return this.pieces.join(""); }

  /** @param {number} token @returns {string} the text that became final */
  push(token) {
    this.tokenIds.push(token);
    const decoded = this.tokenizer.decode(this.tokenIds, { skip_special_tokens: true });
    if (decoded.endsWith("\uFFFD")) return ""; // a character still incomplete
    const chunk = decoded.slice(this.decodedLength);
    this.decodedLength = decoded.length;
    if (!chunk) return "";
    const pending = this.pending + chunk;
    const hits = this.stop.map((s) => pending.indexOf(s)).filter((i) => i >= 0);
    if (hits.length) {
      this.pending = "";
      this.finishReason = "stop";
      return this.emit(pending.slice(0, Math.min(...hits)));
    }
    const hold = this.heldBack(pending);
    this.pending = hold ? pending.slice(pending.length - hold) : "";
    return this.emit(pending.slice(0, pending.length - hold));
  }

  /** @param {string} reason eos or length @returns {string} text still held back */
  finish(reason) {
    this.finishReason = reason;
    const rest = this.pending;
    this.pending = "";
    return this.emit(rest);
  }

  heldBack(text) {
    const longest = Math.max(0, ...this.stop.map((s) => s.length - 1));
    for (let size = Math.min(longest, text.length); size > 0; size--) {
      const tail = text.slice(-size);
      if (this.stop.some((s) => s.startsWith(tail))) return size;
    }
    return 0;
  }

  emit(piece) {
    if (piece) this.pieces.push(piece);
    return piece;
  }
}
