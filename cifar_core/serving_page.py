"""The page ``cifar serve`` answers at ``/``: choose or drop images, see each one's top-3.

Self-contained (no CDN, no external font: clusters and air-gapped machines are offline),
small, readable on a phone, usable from the keyboard (the drop zone is the file input's label:
Tab to it, Enter or Space to choose). It posts the chosen files to ``/predict`` as multipart
form files in the field ``file`` and shows, per image, its top-3 classes as bars, and which
model answered (from ``/model``, with its test accuracy).
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cifar-fleet: try a model</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 46rem; padding: 1rem;
        color: #1d2733; background: #fff; }
 h1 { font-size: 1.4rem; margin: 0.2rem 0 0.6rem; }
 #model { color: #4a5663; font-size: 0.95rem; margin-bottom: 1rem; }
 #drop { display: block; border: 2px dashed #7a8899; border-radius: 0.6rem; padding: 1.6rem;
         text-align: center; cursor: pointer; font-size: 1.05rem; }
 #drop:focus-within, #drop.over { border-color: #1f6feb; background: #eef4ff; outline: none; }
 #drop input { position: absolute; opacity: 0; width: 1px; height: 1px; }
 .card { display: flex; gap: 1rem; align-items: center; border-bottom: 1px solid #e3e8ee;
         padding: 0.8rem 0; }
 .card img { width: 96px; height: 96px; object-fit: contain; image-rendering: pixelated;
             background: #f3f5f7; border-radius: 0.3rem; flex: none; }
 .bars { flex: 1; min-width: 0; }
 .name { font-size: 0.85rem; color: #4a5663; overflow-wrap: anywhere; }
 .bar { display: flex; align-items: center; gap: 0.5rem; margin: 0.25rem 0; }
 .bar span { width: 6.5rem; flex: none; }
 .bar .track { flex: 1; background: #e3e8ee; border-radius: 0.25rem; height: 1.1rem; }
 .bar .fill { background: #1f6feb; height: 100%; border-radius: 0.25rem; }
 .bar b { width: 3.5rem; text-align: right; flex: none; font-weight: 600; }
 .error { color: #b42318; }
</style></head>
<body>
<h1>Try a CIFAR-10 classifier</h1>
<div id="model">Loading which model answers...</div>
<label id="drop">Drop images here, or press Enter to choose files
 <input id="file" type="file" accept="image/png,image/jpeg,image/bmp,image/gif,image/webp"
        multiple aria-label="Images to classify"></label>
<div id="results" aria-live="polite"></div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const results = document.getElementById("results");
fetch("model").then(r => r.json()).then(m => {
  const acc = m.test_accuracy == null ? "test accuracy unknown"
    : "test accuracy " + (100 * m.test_accuracy).toFixed(1) + "%";
  document.getElementById("model").textContent =
    "Answering: " + m.model + " (trial " + m.trial_id + "), " + acc + ".";
});
function text(tag, cls, value) {
  const node = document.createElement(tag); node.className = cls; node.textContent = value;
  return node;
}
async function classify(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  const response = await fetch("predict", {method: "POST", body: form});
  const answer = await response.json();
  results.replaceChildren();
  if (!response.ok) { results.append(text("p", "error", answer.error)); return; }
  answer.predictions.forEach((p, i) => {
    const card = document.createElement("div"); card.className = "card";
    const img = document.createElement("img"); img.alt = p.name;
    img.src = URL.createObjectURL(files[i]); card.append(img);
    const bars = document.createElement("div"); bars.className = "bars";
    bars.append(text("div", "name", p.name));
    if (p.status !== "ok") bars.append(text("div", "error", p.error));
    for (const t of p.top3) {
      const bar = document.createElement("div"); bar.className = "bar";
      bar.append(text("span", "", t["class"]));
      const track = document.createElement("div"); track.className = "track";
      const fill = document.createElement("div"); fill.className = "fill";
      fill.style.width = (100 * t.probability).toFixed(1) + "%"; track.append(fill);
      bar.append(track, text("b", "", (100 * t.probability).toFixed(1) + "%"));
      bars.append(bar);
    }
    card.append(bars); results.append(card);
  });
}
input.addEventListener("change", () => classify([...input.files]));
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") {
  e.preventDefault(); input.click(); } });
for (const kind of ["dragenter", "dragover"]) drop.addEventListener(kind, e => {
  e.preventDefault(); drop.classList.add("over"); });
for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, e => {
  e.preventDefault(); drop.classList.remove("over"); });
drop.addEventListener("drop", e => classify([...e.dataTransfer.files]));
</script>
</body></html>
"""
