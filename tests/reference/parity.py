# The reference recipe from the harness's initial weights (checked equal to the reference's own seed-0 init), fp32 on
# CPU, printing the harness's step-line format.
# usage: parity.py INIT.safetensors SHARD.bin n_layer n_head n_embd seq_len batch steps lr_muon lr_adam [causal|tau|tau-lt]
import json, os, struct, sys, types
import torch

sys.modules["tiktoken"] = types.ModuleType("tiktoken")  # ref_train imports it for data loading, unused here
sys.modules["tiktoken.load"] = types.SimpleNamespace(load_tiktoken_bpe=None)
sys.path.insert(0, os.path.dirname(__file__))
import ref_train as R

init, shard = sys.argv[1], sys.argv[2]
R.L, R.H, R.C, R.T, B, steps = (int(a) for a in sys.argv[3:9])
R.D = R.C // R.H
lr_muon, lr_adam = float(sys.argv[9]), float(sys.argv[10])
variant = sys.argv[11] if len(sys.argv) > 11 else "causal"

def load_safetensors(path):  # f32 tensors only, as --save-checkpoint writes them
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", v
        a, b = v["data_offsets"]
        out[k] = torch.frombuffer(bytearray(raw[8 + n + a:8 + n + b]), dtype=torch.float32).view(v["shape"])
    return out

w = load_safetensors(init)
torch.manual_seed(0)  # the harness's default --seed: its initial weights must be the reference's, bit for bit
m = R.GPT("causal" if variant == "causal" else "tau", variant == "tau-lt")
sd = {"wte.weight": w["wte"]}
for i in range(R.L):
    sd[f"blocks.{i}.a.qkv.weight"] = w[f"blocks.{i}.attn.qkv"]
    sd[f"blocks.{i}.a.o.weight"] = w[f"blocks.{i}.attn.o"]
    sd[f"blocks.{i}.fc.weight"] = w[f"blocks.{i}.mlp.fc"]
    sd[f"blocks.{i}.pr.weight"] = w[f"blocks.{i}.mlp.proj"]
    if variant == "tau-lt":
        sd[f"blocks.{i}.a.log_inv_temp"] = w[f"blocks.{i}.attn.log_inv_temp"].view(R.H, 1, 1)
own = m.state_dict()
differ = [k for k, v in sd.items() if not torch.equal(own[k], v)]
assert not differ, f"the harness's initial weights differ from torch.manual_seed(0)'s: {differ}"
missing = [k for k in m.load_state_dict(sd, strict=False).missing_keys if "log_inv_temp" not in k]
assert not missing, missing

def zeropower_f32(G, steps=5):  # the reference's Newton–Schulz, in fp32 as the harness runs it on CPU
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    X = X / (X.norm() + 1e-7)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X
R.zeropower = zeropower_f32

raw = open(shard, "rb").read()
tr = torch.frombuffer(bytearray(raw[1024:]), dtype=torch.int16).to(torch.int64) & 0xFFFF
mats = [p for n, p in m.named_parameters() if p.ndim == 2 and "wte" not in n]
others = [p for n, p in m.named_parameters() if (p.ndim != 2 or "wte" in n) and p.requires_grad]
def batch(i):
    n = B * R.T
    s = (i * n) % (tr.numel() - n - 1)
    x = tr[s:s + n + 1]
    return x[:-1].view(B, R.T), x[1:].view(B, R.T)
if variant != "causal":  # the reference's calibration: median energy of block 0's keys on the first batch
    with torch.no_grad():
        m(*batch(0))
        tau = m.blocks[0].a.Ek.float().median()
    for blk in m.blocks:
        blk.a.Lap.copy_(w["laplacian"])
        blk.a.tau.fill_(tau)
o1 = R.Muon(mats, lr=lr_muon)
o2 = torch.optim.Adam(others, lr=lr_adam, betas=(0.8, 0.95), eps=1e-10)
for i in range(steps):  # warm-up 1 step, no cool-down: every step at the full rate
    loss = m(*batch(i))
    loss.backward()
    o1.step()
    o2.step()
    m.zero_grad(set_to_none=True)
    print(f"step:{i + 1}/{steps} train_loss:{loss.item():.4f}")
