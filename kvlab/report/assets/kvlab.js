// kvlab's site: one switch per notebook page that unfolds (or folds) every code cell at once.
// The choice is remembered while the reader moves between pages.
document.addEventListener("DOMContentLoaded", () => {
  const folds = Array.from(document.querySelectorAll("details.hide.above-input"));
  const article = document.querySelector("article.bd-article");
  if (!folds.length || !article) return;
  const key = "kvlab-show-code";
  const button = document.createElement("button");
  button.className = "kv-code-toggle";
  button.type = "button";
  const set = (open) => {
    folds.forEach((d) => { d.open = open; });
    button.textContent = open ? "Hide all code" : "Show all code";
    button.setAttribute("aria-pressed", String(open));
    try { localStorage.setItem(key, open ? "1" : "0"); } catch (e) { /* storage off: still works */ }
  };
  button.addEventListener("click", () => set(button.getAttribute("aria-pressed") !== "true"));
  let stored = "0";
  try { stored = localStorage.getItem(key) || "0"; } catch (e) { /* storage off */ }
  article.prepend(button);
  set(stored === "1");
});
