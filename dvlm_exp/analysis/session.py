"""The session that runs the probes alongside a generator over a task."""

from __future__ import annotations


from dvlm_exp.analysis.aggregate import aggregate
from dvlm_exp.analysis.layout import image_layout
from dvlm_exp.analysis.probes import ANALYSIS_VERSION, AttentionProbe, CONF_FIELDS, CONTRIB_FIELDS, ConfidenceProbe, KEY_TYPES, KeptProbe, QUERY_GROUPS


# ---------------------------------------------------------------------------------- session
class AnalysisSession:
    """The three probes plus per-sample metadata (question, prediction, image layout)."""

    def __init__(self, model=None, contributions: bool = True, contrib_threshold: float = 0.995,
                 keep_images: int | None = None):
        self.model = model
        self.keep_images = keep_images  # images kept for the first N samples (overlays); None: all
        self.attention = AttentionProbe(contributions, contrib_threshold)
        self.confidence = ConfidenceProbe()
        self.kept = KeptProbe()
        self.meta: list[dict] = []
        self.images: dict = {}  # sample_id -> list of PIL images (for overlays)

    @property
    def probes(self) -> list:
        return [self.attention, self.confidence, self.kept]

    def begin_sample(self, sample_id, question: str = "", images=()) -> None:
        for p in self.probes:
            p.begin_sample(sample_id)
        imgs = [im for im in (images or []) if hasattr(im, "size") and hasattr(im, "convert")]
        if self.keep_images is None or len(self.meta) < self.keep_images:
            self.images[sample_id] = imgs
        layout = None
        if self.model is not None and imgs and len(imgs) == len(images or []):
            try:
                layout = image_layout(self.model, imgs)
            except Exception:  # noqa: BLE001 - a model without the LLaDA-V image path: no overlay
                layout = None
        self.meta.append({"sample_id": sample_id, "question": question,
                          "image_sizes": [list(im.size) for im in imgs], "layout": layout})

    def end_sample(self, prediction: str, record=None) -> None:
        m = self.meta[-1]
        m["prediction"] = prediction
        if record is not None:
            m["n_visual"] = int(record.n_visual)
            m["n_forwards"] = int(record.n_forwards)
            m["latency_s"] = float(record.latency_s)
        lay = m.get("layout")
        if lay is not None and lay["n_tokens"] != self.kept.current["n_visual"]:
            m["layout"] = None  # the token layout does not match what the model produced

    def to_json(self, config: dict | None = None, n_layers: int | None = None) -> dict:
        samples = []
        for m, a, c, k in zip(self.meta, self.attention.samples, self.confidence.samples, self.kept.samples):
            samples.append({**m, "attention": a["attention"], "contrib": a["contrib"], "confidence": c["steps"],
                            "sampler_confidence": c["sampler"], "n_visual0": k["n_visual"],
                            "visual_positions": k["visual_positions"], "kept_segments": k["segments"]})
        data = {"version": ANALYSIS_VERSION, "config": config, "n_layers": n_layers,
                "contrib_threshold": self.attention.contrib_threshold,
                "key_types": list(KEY_TYPES), "query_groups": list(QUERY_GROUPS),
                "contrib_fields": list(CONTRIB_FIELDS), "conf_fields": list(CONF_FIELDS),
                "attention_columns": ["step", "layer", "group", "n_rows", *KEY_TYPES],
                "samples": samples}
        data["aggregate"] = aggregate(data)
        return data
