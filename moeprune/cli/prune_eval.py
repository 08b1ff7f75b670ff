"""Held-out perplexity on the built-in corpora, printed by `moeprune prune --eval`."""

from __future__ import annotations

from moeprune.calibration.builtin_corpus import builtin_documents
from moeprune.evaluation.perplexity import perplexity


def heldout_perplexities_streamed(path, tokenizer, max_tokens: int, seq_len: int = 256, **kwargs) -> dict[str, float]:
    """`heldout_perplexities` of checkpoint directory `path`, one decoder layer at a time."""
    from moeprune.data.texts import encode_texts
    from moeprune.evaluation.streamed_perplexity import streamed_perplexity

    return {
        domain: streamed_perplexity(path, encode_texts(tokenizer, builtin_documents(domain, "heldout"), max_tokens=max_tokens),
                                    seq_len=seq_len, **kwargs)
        for domain in ("code", "prose")
    }


def report_streamed_eval(recipe, output, memory_budget: str, echo) -> dict[str, dict[str, float]]:
    """`prune --offload --eval`: dense (input) vs pruned (output) held-out perplexity, both streamed;
    printed and written to `moeprune_eval.json` in the output."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from moeprune.devices import resolve_device
    from moeprune.io.loading import resolve_model_path, trust_remote_code

    source = resolve_model_path(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code())
    opts = {"device": resolve_device(recipe.device), "memory_budget": memory_budget, "progress": False}
    result = {"dense": heldout_perplexities_streamed(source, tokenizer, recipe.eval_max_tokens, **opts)}
    try:
        result["pruned"] = heldout_perplexities_streamed(output, tokenizer, recipe.eval_max_tokens, **opts)
    except ValueError as err:  # non-uniform / novice outputs: the config alone cannot rebuild them
        echo(f"pruned perplexity not computed streamed: {err}")
        result["pruned"] = {d: None for d in result["dense"]}
    echo("held-out perplexity   dense     pruned")
    for domain in result["dense"]:
        pruned = result["pruned"][domain]
        echo(f"  {domain:<18} {result['dense'][domain]:>8.2f}  {'n/a' if pruned is None else f'{pruned:.2f}':>9}")
    (Path(output) / "moeprune_eval.json").write_text(json.dumps({**result, "streamed": True}, indent=1))
    return result


def heldout_perplexities(model, tokenizer, max_tokens: int, seq_len: int = 256) -> dict[str, float]:
    """{"code": ppl, "prose": ppl} on the held-out split, capped at `max_tokens` tokens each."""
    return {
        domain: perplexity(model, tokenizer, builtin_documents(domain, "heldout"), seq_len=seq_len, max_tokens=max_tokens)
        for domain in ("code", "prose")
    }
