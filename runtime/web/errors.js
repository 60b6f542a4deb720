/**
 * The error kinds of reft_edge.errors, for the browser: same class names, same one-line messages
 * (what was found, what was expected, how to fix it).
 *
 * @example
 *   import { PatchFormatError } from "./errors.js";
 *   try { await parsePatch(bytes, "alice.reft"); }
 *   catch (e) { if (e instanceof PatchFormatError) console.log(e.name, e.message); }
 */

/** An error the user can fix (bad input, missing file, wrong option). */
export class ReftEdgeError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** An option or argument has a value that cannot work. */
export class UsageError extends ReftEdgeError {}

/** A patch file is at fault. */
export class PatchError extends ReftEdgeError {}

/** The patch is unreadable, damaged, has a wrong digest, non-finite values or bad shapes. */
export class PatchFormatError extends PatchError {}

/** The patch was trained on another base model (fingerprints differ). */
export class BackboneMismatchError extends PatchError {}

/** The patch targets layers or a hidden size the bundle does not offer. */
export class PatchCompatibilityError extends PatchError {}

/** A bundle is missing a file or holds a damaged one. */
export class BundleError extends ReftEdgeError {}
