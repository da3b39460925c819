// Building the page's elements. Text always goes in as text (textContent / text nodes), never
// as markup: nothing a notification or a health report says can become HTML.

/**
 * h("li", {class: "row", dataset: {id: 7}, onclick: fn}, "text", childElement, null)
 * Attributes are set with setAttribute (or as properties for `on*` handlers, `dataset`,
 * `hidden`, `disabled`); children are elements or strings (strings become text nodes).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "dataset") {
      for (const [key, v] of Object.entries(value)) el.dataset[key] = String(v);
    } else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "hidden" || name === "disabled" || name === "open") {
      el[name] = Boolean(value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace every child of `el` with `children`. */
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el;
}

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: "numeric",
  month: "short",
  day: "numeric",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});

/** A <time> element: local, readable text; the exact instant in its datetime and title. */
export function timeElement(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return h("time", {}, String(iso));
  return h("time", { datetime: when.toISOString(), title: when.toISOString() }, dateTime.format(when));
}
