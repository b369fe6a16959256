// The preview page's only script: posts CDS Hooks 2.0 feedback for a card, as an EHR would, when a
// suggestion is accepted or the card is overridden, and shows the service's answer. Plain DOM, no
// libraries; everything it writes goes through textContent, never innerHTML.
"use strict";

(function () {
  const results = document.getElementById("results");
  if (!results) {
    return;
  }
  const feedbackUrl = results.dataset.feedbackUrl;

  function accepted(card, button) {
    return {
      card: card.dataset.card,
      outcome: "accepted",
      acceptedSuggestions: [{ id: button.dataset.suggestion }],
      outcomeTimestamp: new Date().toISOString(),
    };
  }

  function overridden(card) {
    const entry = { card: card.dataset.card, outcome: "overridden", outcomeTimestamp: new Date().toISOString() };
    const select = card.querySelector(".override-reason");
    const option = select ? select.selectedOptions[0] : null;
    const comment = (card.querySelector(".override-comment") || {}).value || "";
    if ((option && option.value !== "") || comment) {
      entry.overrideReason = {};
      if (option && option.value !== "") {
        const d = option.dataset;
        entry.overrideReason.reason = { system: d.system, code: d.code, display: d.display };
      }
      if (comment) {
        entry.overrideReason.userComment = comment;
      }
    }
    return entry;
  }

  function show(card, state, text, sent) {
    const status = card.querySelector(".feedback-status");
    status.dataset.state = state;
    status.textContent = text;
    card.querySelector(".feedback-json").textContent = JSON.stringify(sent, null, 2);
  }

  // Only the button that was pressed waits for the answer: CDS Hooks lets a user take one suggestion
  // and still take another, or override the card, so the rest of the card stays usable.
  async function send(card, entry, what, button) {
    const body = { feedback: [entry] };
    button.disabled = true;
    try {
      const response = await fetch(feedbackUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        credentials: "omit",
      });
      const text = await response.text();
      if (response.ok) {
        card.dataset.outcome = entry.outcome;
        show(card, "ok", what + ": feedback stored (HTTP " + response.status + ")", body);
        if (button.classList.contains("suggestion")) {
          button.dataset.taken = "true";  // a taken suggestion stays taken: no second order
        } else {
          button.disabled = false;
        }
        return;
      }
      let reason = text;
      try {
        const outcome = JSON.parse(text);
        reason = outcome.issue.map((i) => i.diagnostics).join("; ");
      } catch (ignored) {
        // not an OperationOutcome: show the raw text
      }
      show(card, "error", what + ": the service refused the feedback (HTTP " + response.status + "): " + reason, body);
    } catch (error) {
      show(card, "error", what + ": could not reach the service (" + error + ")", body);
    }
    button.disabled = false;  // refused or failed: let the user try again
  }

  // A chosen patient far down the list is scrolled into view in the list (not the page).
  const chosen = document.querySelector(".patient.chosen");
  if (chosen) {
    const list = chosen.closest(".patients");
    if (list) {
      list.scrollTop = Math.max(0, chosen.offsetTop - list.clientHeight / 3);
    }
  }

  results.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    const card = button ? button.closest("article.card") : null;
    if (!card) {
      return;
    }
    if (button.classList.contains("suggestion")) {
      send(card, accepted(card, button), "Accepted \u201c" + button.textContent.trim() + "\u201d", button);
    } else if (button.classList.contains("dismiss")) {
      send(card, overridden(card), "Overridden", button);
    }
  });
})();
