"""Entry point for lmms-eval's model registry (group `lmms_eval.models` in pyproject.toml)."""


def manifests():
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="dvlm_exp", simple_class_path="dvlm_exp.lmms_adapter.DvlmLMM")]
