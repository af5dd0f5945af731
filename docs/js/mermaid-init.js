// Renders ```mermaid fenced blocks as diagrams in the reader's browser; building the site needs
// no network. Offline, the blocks stay as readable text.
const blocks = document.querySelectorAll("pre > code.language-mermaid");
if (blocks.length > 0) {
  try {
    const { default: mermaid } = await import(
      "https://cdn.jsdelivr.net/npm/mermaid@11/dist/mermaid.esm.min.mjs"
    );
    for (const code of blocks) {
      const div = document.createElement("div");
      div.className = "mermaid";
      div.textContent = code.textContent;
      code.parentElement.replaceWith(div);
    }
    mermaid.initialize({ startOnLoad: false });
    await mermaid.run();
  } catch (err) {
    console.warn("mermaid not available; diagrams stay as text", err);
  }
}
