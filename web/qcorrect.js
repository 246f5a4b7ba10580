// qcorrect frontend extension: shows the `text` UI output of the pack's nodes on the node itself
// (Compare To Reference's report, Corrected KSampler's reason, Relax Timesteps' average bit-width).
// The Python side returns `ui.PreviewText(...)`, which arrives here as `message.text` (a list).
import { app } from "../../scripts/app.js";

const NODE_PREFIX = "QCorrect";
const WIDGET_NAME = "qcorrect_text";

function textOf(message) {
  const text = message?.text;
  if (text === undefined || text === null) return null;
  return (Array.isArray(text) ? text : [text]).join("\n");
}

// A read-only multiline box, created on the first execution and reused afterwards. It is neither
// saved in the workflow nor sent with the prompt, so it never shifts the node's widget values.
function textWidget(node) {
  const existing = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (existing) return existing;
  const area = document.createElement("textarea");
  area.readOnly = true;
  area.spellcheck = false;
  Object.assign(area.style, {
    width: "100%",
    fontFamily: "monospace",
    fontSize: "11px",
    whiteSpace: "pre",
    overflow: "auto",
    resize: "none",
    opacity: "0.85",
  });
  const widget = node.addDOMWidget(WIDGET_NAME, "qcorrect_text", area, {
    getValue: () => area.value,
    setValue: (value) => {
      area.value = value ?? "";
    },
    getMinHeight: () => 90,
    serialize: false,
  });
  widget.serialize = false;
  return widget;
}

app.registerExtension({
  name: "qcorrect.nodeText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(NODE_PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = textOf(message);
      if (text === null) return;
      textWidget(this).value = text;
      const fit = this.computeSize();
      this.setSize([Math.max(this.size[0], fit[0]), Math.max(this.size[1], fit[1])]);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
