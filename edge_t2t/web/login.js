// edge-t2t serve: the sign-in page. The token goes to POST /login once; the server answers with an
// HttpOnly cookie, which the page's script never sees. A URL ending in #token=... (what serve prints
// when it makes a token) signs in by itself; the fragment never reaches the server, and is dropped
// from the address bar and the history before the page reloads.
"use strict";

async function signIn(token) {
  const form = new FormData();
  form.append("token", token);
  const message = document.getElementById("login-message");
  message.textContent = "signing in…";
  let resp = null;
  try {
    resp = await fetch("/login", { method: "POST", body: form, credentials: "same-origin" });
  } catch (e) {
    message.textContent = e.message;
    return;
  }
  if (resp.ok) {
    history.replaceState(null, "", location.pathname + location.search);
    location.reload();
    return;
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  message.textContent = (body && body.error) || `${resp.status} ${resp.statusText}`;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn(document.getElementById("token").value.trim());
  });
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname + location.search);
    signIn(decodeURIComponent(m[1]));
  }
});
