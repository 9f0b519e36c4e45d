"""The weight-sharing supernet (kdsearch.models.supernet) and its training and scoring
(kdsearch.train.supernet_training): a subnet is the stand-alone student with the sliced
weights, every encoding and patch size is sampled and scored, training resumes exactly."""

from __future__ import annotations

import dataclasses
import io
import itertools
import math

import numpy as np
import pytest
import torch
from timm.layers import resample_patch_embed

from kdsearch.models.sandwich import SandwichRule
from kdsearch.models.student import StudentViT
from kdsearch.models.supernet import Supernet, SupernetSpec, random_student, sandwich
from kdsearch.space.file import parse_space_text
from kdsearch.space.flops import count_flops
from kdsearch.space.search_space import Budget
from kdsearch.space.specs import POS_EMBEDS, StudentSpec
from kdsearch.train.data import load_data
from kdsearch.train.evaluation import evaluate
from kdsearch.train.setup import TrialSetup
from kdsearch.train.supernet_training import load_supernet, score_subnets, train_supernet

SPACE = """
name: supernet_digits
data: {name: digits, img_size: 8}
teacher: {model: kdsearch/digits_cnn}
student:
  embed_dim: [16, 32]
  depth: [1, 2, 3]
  num_heads: [2, 4]
  mlp_ratio: [1.0, 1.5, 2.0]
  patch_size: [2, 4]
  pos_embed: [learned, sincos, relpos, rope, cpe, none]
  distill_token: [false, true]
recipe: {alpha: 0.5, temperature: 4.0, hard_weight: 0.5}
train: {epochs: 2, batch_size: 64, lr: 2.0e-3, warmup_epochs: 1}
objectives: {val_acc: max, flops: min}
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only waits on a loaded machine (10x slower at load 10);
    set per test, after the session's teacher fixture sets 2."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def space():
    return parse_space_text(SPACE)


@pytest.fixture(scope="module")
def supernet(space) -> Supernet:
    """A supernet whose every parameter is random (not its init: zero biases would hide a wrong slice)."""
    torch.manual_seed(0)
    net = Supernet(SupernetSpec.of_space(space))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net


def _subnets(space) -> list[StudentSpec]:
    """Every encoding x patch size x distillation token, each at another width, depth, heads and MLP ratio."""
    rng = np.random.default_rng(0)
    out = []
    for pe, patch, distill in itertools.product(POS_EMBEDS, (2, 4), (False, True)):
        student = dataclasses.replace(space.sample(rng).student, pos_embed=pe, patch_size=patch, distill_token=distill)
        out.append(student)
    return out


def test_supernet_spec_is_the_union_of_the_space(space) -> None:
    spec = SupernetSpec.of_space(space)
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_hidden) == (32, 3, 4, 64)
    assert spec.patch_sizes == (2, 4) and set(spec.pos_embeds) == set(POS_EMBEDS) and spec.distill_token
    head_dim = parse_space_text(SPACE.replace("embed_dim: [16, 32]", "head_dim: [8, 12]"))
    assert SupernetSpec.of_space(head_dim).embed_dim == 48  # head_dim 12 x 4 heads


def test_subnet_equals_the_standalone_student_with_its_sliced_weights(space, supernet: Supernet) -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    students = _subnets(space)
    assert len({(s.embed_dim, s.depth, s.num_heads, s.mlp_ratio) for s in students}) >= 8
    for student in students:
        model = StudentViT(student)
        model.load_state_dict(supernet.subnet_state_dict(student), strict=True)
        supernet.eval(), model.eval()
        torch.testing.assert_close(supernet(x, student), model(x), atol=1e-5, rtol=0, msg=str(student))
        supernet.train(), model.train()
        a = supernet.forward_distill(x, student, attn=True, block_features=True)
        b = model.forward_distill(x, attn=True, block_features=True)
        for name in ("logits", "dist_logits", "tokens", "attn", "block_features"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=0, msg=name)
        assert a.num_prefix_tokens == b.num_prefix_tokens == student.num_prefix_tokens
    extracted = supernet.extract(students[-1]).eval()
    torch.testing.assert_close(extracted(x), supernet.eval()(x, students[-1]), atol=1e-5, rtol=0)


def test_subnet_weights_are_leading_slices(space, supernet: Supernet) -> None:
    """AutoFormer's entanglement: q, k, v each [:d, :d]; MLP [:m, :d]; the relpos window; the
    patch kernel PI-resized from the largest patch size."""
    base = dict(img_size=8, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.5)
    student = StudentSpec(**base, patch_size=4, pos_embed="relpos")
    sd = supernet.subnet_state_dict(student)
    big = supernet.blocks[1]
    qkv = big.attn.qkv.weight.detach()
    torch.testing.assert_close(
        sd["blocks.1.attn.qkv.weight"], torch.cat([qkv[0:16, :16], qkv[32:48, :16], qkv[64:80, :16]])
    )
    torch.testing.assert_close(sd["blocks.1.mlp.fc1.weight"], big.mlp.fc1.weight.detach()[:24, :16])
    torch.testing.assert_close(sd["blocks.1.mlp.fc2.weight"], big.mlp.fc2.weight.detach()[:16, :24])
    # largest grid 4 (patch 2) -> 7 x 7 offsets; grid 2 (patch 4) takes the central 3 x 3, heads [:2]
    table = supernet.pos_encs["relpos"].rel_pos[1].relative_position_bias_table.detach().view(7, 7, 4)
    torch.testing.assert_close(sd["pos_enc.rel_pos.1.relative_position_bias_table"], table[2:5, 2:5, :2].reshape(9, 2))
    assert "blocks.2.norm1.weight" not in sd and sd["norm.weight"].shape == (16,)
    # patch 4 is the kernel's own size; patch 2 its pseudo-inverse resize, as FlexiViT (timm) makes it
    kernel = supernet.patch_embed["proj"].weight.detach()[:16]
    torch.testing.assert_close(sd["patch_embed.proj.weight"], kernel)
    small = supernet.subnet_state_dict(dataclasses.replace(student, patch_size=2))
    torch.testing.assert_close(small["patch_embed.proj.weight"], resample_patch_embed(kernel, [2, 2]))


def test_gradients_reach_only_the_subnet_slices(space) -> None:
    torch.manual_seed(0)
    net = Supernet(SupernetSpec.of_space(space)).train()
    student = StudentSpec(img_size=8, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=2, mlp_ratio=1.0,
                          patch_size=2, pos_embed="learned")  # fmt: skip
    out = net.forward_distill(torch.randn(2, 1, 8, 8), student)
    out.logits.logsumexp(-1).sum().backward()
    assert net.blocks[2].norm1.weight.grad is None  # past the subnet's depth
    fc1 = net.blocks[0].mlp.fc1.weight.grad
    assert fc1[:16, :16].abs().sum() > 0 and fc1[16:].abs().sum() == 0 and fc1[:, 16:].abs().sum() == 0
    assert net.pos_encs["relpos"].rel_pos[0].relative_position_bias_table.grad is None
    assert net.dist_token.grad is None and net.head_dist.weight.grad is None


def test_sandwich_holds_the_extremes_then_random_students(space) -> None:
    rng = np.random.default_rng(3)
    students = sandwich(space, rng, 4)
    largest, smallest = students[0], students[1]
    assert (largest.embed_dim, largest.depth, largest.mlp_ratio, largest.patch_size, largest.num_heads) == (
        32,
        3,
        2.0,
        2,
        4,
    )
    assert largest.distill_token and not smallest.distill_token
    assert (smallest.embed_dim, smallest.depth, smallest.mlp_ratio, smallest.patch_size, smallest.num_heads) == (
        16,
        1,
        1.0,
        4,
        2,
    )
    assert len(students) == 4 and all(not s.problems() for s in students)
    encodings = {s.pos_embed for _ in range(20) for s in sandwich(space, rng, 2)}
    assert len(encodings) > 2  # the extremes' encodings are drawn, so every encoding's parameters train


def test_sandwich_serves_only_students_within_the_budget(space) -> None:
    unbounded = sandwich(space, np.random.default_rng(0), 1)[0]
    limit = count_flops(unbounded).flops / 2e9  # the space's largest is over the budget
    bounded = dataclasses.replace(space, budget=Budget(max_gflops=limit))
    assert not bounded.budget.feasible(unbounded)
    rule = SandwichRule(bounded)
    rng = np.random.default_rng(1)
    steps = [rule(rng, 4) for _ in range(30)]
    assert all(bounded.budget.feasible(s) and not s.problems() for step in steps for s in step)
    assert len({dataclasses.replace(step[1], pos_embed="none") for step in steps}) == 1  # the smallest stays
    feasible = [s for s in bounded.architectures() if not s.problems() and bounded.budget.feasible(s)]
    for largest in {step[0] for step in steps}:
        rivals = [count_flops(s).flops for s in feasible if s.pos_embed == largest.pos_embed]
        assert count_flops(largest).flops == max(rivals)  # no feasible student has more FLOPs
    assert len({step[0].pos_embed for step in steps}) > 2  # each encoding's largest serves


TRAIN_SPACE = """
name: supernet_training
data: {{name: digits, img_size: 16}}
teacher: {{model: kdsearch/digits_cnn, checkpoint: {teacher}}}
student:
  embed_dim: [16, 32]
  depth: [1, 2]
  num_heads: 2
  mlp_ratio: [1.0, 2.0]
  patch_size: [4, 8]
  pos_embed: [learned, sincos, relpos, rope, cpe, none]
  distill_token: [false, true]
recipe: {{alpha: 0.5, temperature: 4.0, hard_weight: 0.5}}
train: {{epochs: 2, batch_size: 128, lr: 2.0e-3, warmup_epochs: 1, seed: 5}}
objectives: {{val_acc: max, flops: min}}
"""


@pytest.fixture(scope="module")
def train_space(digits_teacher_path):
    return parse_space_text(TRAIN_SPACE.format(teacher=digits_teacher_path))


@pytest.fixture(scope="module")
def digits16(train_space):
    return load_data(train_space)


def test_every_encoding_and_patch_size_is_sampled_and_scored(train_space, digits16) -> None:
    rng = np.random.default_rng(0)
    drawn = [random_student(train_space, rng) for _ in range(60)]
    firsts = {("pos_embed", s.pos_embed): s for s in reversed(drawn)} | {
        ("patch", s.patch_size): s for s in reversed(drawn)
    }
    assert set(firsts) == {("pos_embed", pe) for pe in POS_EMBEDS} | {("patch", 4), ("patch", 8)}
    students = list(dict.fromkeys(firsts.values()))  # the first drawn of each encoding and patch size
    torch.manual_seed(0)
    supernet = Supernet(SupernetSpec.of_space(train_space))
    scores = score_subnets(supernet, students, digits16)
    assert len(scores) == len(students) and all(0.0 <= a <= 1.0 for a in scores)
    # the inherited score is the extracted student's own val accuracy
    for student, score in list(zip(students, scores))[:3]:
        assert evaluate(supernet.extract(student), digits16) == pytest.approx(score, abs=1e-9)


@pytest.fixture(scope="module")
def one_process_run(train_space, digits16, tmp_path_factory):
    """Two epochs in one process: each epoch's report, each saved state (as bytes) and the supernet."""
    setup = TrialSetup(workdir=tmp_path_factory.mktemp("supernet"), data=digits16, device="cpu")
    reports: list[dict] = []
    saved: list[bytes] = []

    def save(state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        saved.append(buffer.getvalue())

    def report(r: dict) -> None:
        reports.append({**r, "threads": torch.get_num_threads()})

    torch.set_num_threads(2)
    whole = train_supernet(train_space, setup, 2, report, save=save, threads=1)
    restored = torch.get_num_threads()
    torch.set_num_threads(1)
    assert restored == 2  # the process's setting is back after training
    return setup, reports, saved, whole


def test_train_supernet_reports_and_continues_from_its_state_exactly(train_space, one_process_run) -> None:
    setup, reports, saved, whole = one_process_run
    assert [r["epoch"] for r in reports] == [1, 2] and len(saved) == 2
    assert [r.pop("threads") for r in reports] == [1, 1]  # trained with the threads it was given
    assert set(reports[0]) == {"epoch", "loss", "seconds", "images_per_s", "largest_val_acc", "smallest_val_acc"}
    assert math.isfinite(reports[0]["loss"]) and reports[1]["loss"] < reports[0]["loss"]
    state = torch.load(io.BytesIO(saved[0]), weights_only=True)
    resumed: list[dict] = []
    continued = train_supernet(train_space, setup, 2, resumed.append, state=state)
    assert [r["epoch"] for r in resumed] == [2]
    assert resumed[0]["loss"] == pytest.approx(reports[1]["loss"], rel=1e-6)
    for (name, a), b in zip(whole.state_dict().items(), continued.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    loaded = load_supernet(train_space, torch.load(io.BytesIO(saved[1]), weights_only=True))
    torch.testing.assert_close(loaded.state_dict()["head.weight"], whole.state_dict()["head.weight"])


@pytest.mark.timeout(300)
def test_two_processes_follow_the_one_process_supernet(train_space, one_process_run, tmp_path) -> None:
    """gloo on the CPU: each process takes half of each batch; the first epoch (its LR is the
    warmup's, whatever the epochs) ends with the one-process loss and weights."""
    setup, reports, saved, _ = one_process_run
    two: list[dict] = []
    net = train_supernet(train_space, dataclasses.replace(setup, workdir=tmp_path, world_size=2), 1, two.append)
    assert [r["epoch"] for r in two] == [1]
    assert two[0]["loss"] == pytest.approx(reports[0]["loss"], rel=1e-3)
    one = torch.load(io.BytesIO(saved[0]), weights_only=True)["model"]
    assert max(float((one[k] - v).abs().max()) for k, v in net.state_dict().items()) < 1e-3
