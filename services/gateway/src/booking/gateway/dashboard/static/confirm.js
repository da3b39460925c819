// The one confirmation dialog every admin action goes through: it says what will happen, takes
// the reason (and a refund's reference) where the route needs one, and runs the action only
// when the admin confirms. An action the server refuses leaves the dialog open with the
// server's own `detail`: the admin reads why, then tries again or goes back.

import { byId } from "./dom.js";

export class Confirmation {
  constructor() {
    this.dialog = byId("confirm");
    this.form = byId("confirm-form");
    this.heading = byId("confirm-heading");
    this.text = byId("confirm-text");
    this.reasonField = byId("confirm-reason-field");
    this.reasonLabel = byId("confirm-reason-label");
    this.reason = byId("confirm-reason");
    this.referenceField = byId("confirm-reference-field");
    this.reference = byId("confirm-reference");
    this.message = byId("confirm-message");
    this.ok = byId("confirm-ok");
    this.back = byId("confirm-back");
    this.asked = null; // {options, resolve} of the question open now
    this.busy = false;

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.confirm();
    });
    this.back.addEventListener("click", () => this.dismiss());
    // Escape: the browser's cancel. Not while the action is on its way.
    this.dialog.addEventListener("cancel", (event) => {
      event.preventDefault();
      if (!this.busy) this.dismiss();
    });
  }

  /**
   * Ask before acting. options: {
   *   title, text,
   *   confirm: the confirming button's text ("Replay"),
   *   danger: true for what cannot be undone,
   *   reason: "required" | "optional" | undefined (no reason asked),
   *   reference: true to ask for a refund's reference (required),
   *   run: async ({reason, reference}) => result
   * }
   * Resolves with run's result once it succeeded, or null when the admin went back.
   */
  ask(options) {
    this.dismiss();
    return new Promise((resolve) => {
      this.asked = { options, resolve };
      this.heading.textContent = options.title;
      this.text.textContent = options.text;
      this.reasonField.hidden = !options.reason;
      this.reasonLabel.textContent = options.reason === "required" ? "Reason (required)" : "Reason (optional)";
      this.reason.value = "";
      this.reason.required = options.reason === "required";
      this.referenceField.hidden = !options.reference;
      this.reference.value = "";
      this.reference.required = Boolean(options.reference);
      this.message.textContent = "";
      this.ok.textContent = options.confirm;
      this.ok.className = options.danger ? "primary danger" : "primary";
      this.setBusy(false);
      this.dialog.showModal();
      // Straight to what must be typed; otherwise "Go back" has the focus, so that Enter
      // alone never confirms what cannot be undone.
      (options.reason ? this.reason : this.back).focus();
    });
  }

  async confirm() {
    if (!this.asked || this.busy) return;
    const { options, resolve } = this.asked;
    const reason = this.reason.value.trim();
    const reference = this.reference.value.trim();
    if (options.reason === "required" && !reason) {
      this.message.textContent = "Say why: the reason is kept in the audit trail with who and when.";
      this.reason.focus();
      return;
    }
    if (options.reference && !reference) {
      this.message.textContent = "The refund's reference is required: the payment that paid it back.";
      this.reference.focus();
      return;
    }
    this.setBusy(true);
    this.message.textContent = "Working…";
    let result;
    try {
      result = await options.run({ reason: reason || null, reference: reference || null });
    } catch (error) {
      if (this.asked?.resolve !== resolve) return; // dismissed meanwhile (signed out)
      this.setBusy(false);
      this.message.textContent = error.detail ?? error.message;
      this.ok.focus();
      return;
    }
    if (this.asked?.resolve !== resolve) return;
    this.asked = null;
    this.setBusy(false);
    this.dialog.close();
    resolve(result);
  }

  /** Close without acting (going back, signing out); the question resolves to null. */
  dismiss() {
    const asked = this.asked;
    this.asked = null;
    this.setBusy(false);
    if (this.dialog.open) this.dialog.close();
    if (asked) asked.resolve(null);
  }

  setBusy(busy) {
    this.busy = busy;
    this.ok.disabled = busy;
    this.back.disabled = busy;
    this.reason.readOnly = busy;
    this.reference.readOnly = busy;
  }
}
