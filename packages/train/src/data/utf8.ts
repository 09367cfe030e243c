/**
 * UTF-8 arithmetic the stream reader needs without decoding: a string's encoded length (no copy
 * of a big string), where a byte run can be cut without splitting a character, and where the first
 * invalid byte is (for the error message; the decoding itself is TextDecoder's, fatal).
 */

/** Bytes of `text` in UTF-8, counted without encoding it (a lone surrogate counts as U+FFFD: 3). */
export function utf8Length(text: string): number {
  let n = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) {
        n += 4;
        i++;
      } else n += 3;
    } else n += 3;
  }
  return n;
}

/**
 * The length of the longest prefix of `bytes` that does not end inside a multi-byte character:
 * `bytes.length`, or less when the last 1 to 3 bytes begin a character that continues beyond.
 * (A run that is invalid anyway is left whole, for the decoder to report.)
 */
export function completePrefix(bytes: Uint8Array): number {
  const n = bytes.length;
  let lead = n - 1;
  while (lead >= 0 && n - lead <= 3 && ((bytes[lead] as number) & 0xc0) === 0x80) lead--;
  if (lead < 0) return n;
  const b = bytes[lead] as number;
  const size = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
  return n - lead < size ? lead : n;
}

/**
 * The index of the first byte of the first sequence that is not well-formed UTF-8 (RFC 3629:
 * no overlong forms, no surrogates, nothing above U+10FFFF), or -1 when all of `bytes` is valid.
 * A character cut off by the end of `bytes` counts as invalid at its first byte.
 */
export function firstInvalidByte(bytes: Uint8Array): number {
  const n = bytes.length;
  let i = 0;
  while (i < n) {
    const b = bytes[i] as number;
    if (b < 0x80) {
      i++;
      continue;
    }
    // The allowed range of the second byte depends on the first (Unicode table 3-7).
    let size: number;
    let low = 0x80;
    let high = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) size = 2;
    else if (b >= 0xe0 && b <= 0xef) {
      size = 3;
      if (b === 0xe0) low = 0xa0;
      if (b === 0xed) high = 0x9f;
    } else if (b >= 0xf0 && b <= 0xf4) {
      size = 4;
      if (b === 0xf0) low = 0x90;
      if (b === 0xf4) high = 0x8f;
    } else return i;
    if (i + size > n) return i;
    const second = bytes[i + 1] as number;
    if (second < low || second > high) return i;
    for (let k = 2; k < size; k++) if (((bytes[i + k] as number) & 0xc0) !== 0x80) return i;
    i += size;
  }
  return -1;
}
