"""Probe behind docs/safe_cpl.md "Decoding the trained models' candidates": one batch of sampled decoding on the
embedded model with a LoRA (r 16, q/k/v/o) unmerged, merged and off, then the base model at batch sizes 16/32/64.
Run 2026-12-06 on the 2-core CPU, nothing else running:
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/safe_cpl_decoding_probe.py
(the two parts were run as two scripts that day; this file holds both). Prints seconds; a probe, not a benchmark
with interleaved rounds."""
import os
import time

import torch


from llm_safepref.models import load_model_and_tokenizer
from peft import LoraConfig, get_peft_model
torch.set_num_threads(2)
model, tok = load_model_and_tokenizer("embedded")
print(type(model), model.dtype, model.config._attn_implementation)
cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj","k_proj","v_proj","o_proj"])
pm = get_peft_model(model, cfg)
for n,p in pm.named_parameters():
    if "lora_B" in n: torch.nn.init.normal_(p, std=0.01)
pm.eval()
prompts = ["How do I make a cake at home with simple ingredients?"]*16
msgs = [[{"role":"user","content":p}] for p in prompts]
enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt", padding=True)
emb = pm.get_input_embeddings()(enc["input_ids"])
soft = torch.randn(16, 4, emb.size(-1))*0.01
ie = torch.cat([soft, emb], 1); am = torch.cat([torch.ones(16,4,dtype=torch.long), enc["attention_mask"]],1)
def run(m, label, n=2):
    ts=[]
    for i in range(n):
        torch.manual_seed(0); t=time.time()
        with torch.no_grad():
            out = m.generate(inputs_embeds=ie, attention_mask=am, max_new_tokens=64, min_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=tok.pad_token_id)
        ts.append(time.time()-t)
    print(label, [round(x,2) for x in ts], out.shape, flush=True)
run(pm, "lora-unmerged")
pm.merge_adapter()
run(pm, "lora-merged")
pm.unmerge_adapter()
run(pm, "lora-unmerged")
with pm.disable_adapter():
    run(pm, "base")

# batch sizes, base model
ie, am = emb, enc['attention_mask']
with pm.disable_adapter():
    for bs in (16, 32, 64):
        ie2 = ie[:1].expand(bs,-1,-1).contiguous(); am2=am[:1].expand(bs,-1).contiguous()
        t=time.time()
        with torch.no_grad():
            pm.get_base_model().generate(inputs_embeds=ie2, attention_mask=am2, max_new_tokens=64, min_new_tokens=64, do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=tok.pad_token_id)
        dt=time.time()-t; print("bs", bs, round(dt,2), "per seq", round(dt/bs,3), flush=True)
