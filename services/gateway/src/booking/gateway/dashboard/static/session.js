// The admin's token: pasted, kept in sessionStorage (this tab, this browser session), read
// client-side only to tell the admin early what the server would say (expired, not an admin's).
// The server decides: its 401 and 403 answers are what sign the admin out.

const KEY = "booking.admin.token";

export class TokenProblem extends Error {
  /** kind: "missing" | "malformed" | "expired" | "not-admin" | "refused" */
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

export function storedToken() {
  try {
    return sessionStorage.getItem(KEY);
  } catch {
    return null; // storage disabled: the admin pastes the token again on reload
  }
}

export function storeToken(token) {
  try {
    sessionStorage.setItem(KEY, token);
  } catch {
    // storage disabled: the token lives as long as the page
  }
}

export function forgetToken() {
  try {
    sessionStorage.removeItem(KEY);
  } catch {
    // nothing stored
  }
}

/** The token as pasted, without spaces or a leading "Bearer ". */
export function cleanToken(text) {
  return (text || "").trim().replace(/^bearer\s+/i, "").replace(/\s+/g, "");
}

function base64UrlJson(part) {
  const base64 = part.replace(/-/g, "+").replace(/_/g, "/");
  const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
  const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  return JSON.parse(new TextDecoder().decode(bytes));
}

/** The JWT's claims, unverified (the signature is the server's to check). */
export function claimsOf(token) {
  const parts = token.split(".");
  if (parts.length !== 3) {
    throw new TokenProblem("malformed", "That is not a token: a JWT has three parts separated by dots.");
  }
  try {
    const claims = base64UrlJson(parts[1]);
    if (typeof claims !== "object" || claims === null) throw new Error("not an object");
    return claims;
  } catch {
    throw new TokenProblem("malformed", "That is not a token: its claims cannot be read.");
  }
}

/** Throws a TokenProblem when the token is missing, unreadable, expired or not an admin's. */
export function checkToken(token, now = Date.now()) {
  if (!token) throw new TokenProblem("missing", "No token: paste an admin token to sign in.");
  const claims = claimsOf(token);
  if (typeof claims.exp === "number" && claims.exp * 1000 <= now) {
    const when = new Date(claims.exp * 1000).toLocaleString();
    throw new TokenProblem("expired", `This token expired at ${when}. Paste a new admin token.`);
  }
  if (claims.role !== undefined && claims.role !== "admin") {
    throw new TokenProblem(
      "not-admin",
      `This token is not an admin's (its role is ${String(claims.role)}). The dashboard is for admins.`,
    );
  }
  return claims;
}

/** Milliseconds until the token expires (null when it carries no exp). */
export function msUntilExpiry(claims, now = Date.now()) {
  return typeof claims.exp === "number" ? claims.exp * 1000 - now : null;
}
