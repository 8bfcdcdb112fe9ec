"""The losses and metrics of common.py, and the objective that training uses, against naive or
hand computations."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness


def naive_jacobian(model, x, create_graph):
    """d logits / d x per sample, one autograd call per class: [B, C, D]."""
    x = x.clone().requires_grad_(True)
    logits = model(x)
    rows = [torch.autograd.grad(logits[:, c].sum(), x, create_graph=create_graph,
                                retain_graph=True)[0]
            for c in range(logits.shape[1])]
    return torch.stack(rows, 1).flatten(2)


def naive_loss(student, teacher, x, rows=None):
    js = naive_jacobian(student, x, True)
    jt = naive_jacobian(teacher, x, False).detach()
    if rows is not None:  # [B, K] class indices per sample
        js = js[torch.arange(len(x))[:, None], rows]
        jt = jt[torch.arange(len(x))[:, None], rows]
    js, jt = js.flatten(1), jt.flatten(1)
    js = js / (js.norm(dim=1, keepdim=True) + 1e-8)
    jt = jt / (jt.norm(dim=1, keepdim=True) + 1e-8)
    return (jt - js).norm(dim=1).mean()


def grads(loss, module):
    params = list(module.parameters())
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


class TanhMLP(nn.Module):
    """A model without convolutions or ReLU, with the interface distillation needs (features,
    classifier)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(2 * 5 * 5, 16), nn.Tanh())
        self.classifier = nn.Linear(16, 7)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.classifier(self.body(x))


def models():
    """Pairs of (student, teacher) without BatchNorm: CNNs of two widths and a tanh MLP."""
    torch.manual_seed(0)
    return [(common.SmallCNN(2, 7, 4), common.freeze(common.SmallCNN(2, 7, 6))),
            (TanhMLP(), common.freeze(TanhMLP()))]


def naive_kl(student_logits, teacher_logits, T, t2=True):
    """Hinton's term by hand: mean over samples of sum_c p_t (log p_t - log p_s) at temperature T,
    times T^2 when t2."""
    p_t = torch.softmax(teacher_logits / T, 1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student_logits / T, 1))).sum(1).mean()
    return T * T * kl if t2 else kl


def training_objective(student, teacher, train_x, idx, cfg, max_bytes=2e9, generator=None):
    """One batch's loss through the path distill() trains with: the teacher's targets precomputed
    on the whole training set, then the objective on the rows `idx`."""
    top_k = None if cfg.jacobian_estimator == "projection" else cfg.top_k
    targets = common.teacher_targets(teacher, train_x, ("logits", "jacobian"), top_k=top_k,
                                     method=cfg.jacobian_method, max_bytes=max_bytes)
    objective = common.distillation_objective(student, teacher, targets, cfg, generator=generator)
    return common.total_loss(objective(train_x[idx], torch.zeros(len(idx), dtype=torch.long),
                                       idx)), targets


def assert_same_loss_and_student_grads(got, expected, student):
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)
    got_grads = grads(got, student)
    for g_got, g_exp in zip(got_grads, grads(expected, student)):
        assert torch.allclose(g_got, g_exp, atol=1e-5, rtol=1e-4)
    assert sum(g.abs().sum() for g in got_grads) > 0  # the student side is differentiable


def inputs(pair, n=8):
    torch.manual_seed(1)
    return torch.rand(n, 2, 5, 5) if pair == 1 else torch.rand(n, 2, 12, 12)


IDX = torch.tensor([5, 1, 6, 2])  # a batch is a set of rows of the training set, in any order


@pytest.mark.parametrize("method,pair",
                         [(m, p) for m in ("loop", "batched", "vmap", "auto") for p in range(2)]
                         + [("explicit", 0)])
def test_training_objective_matches_naive_per_class_reference(method, pair):
    student, teacher = models()[pair]
    train_x = inputs(pair)
    cfg = harness.DistillSettings(loss="jacobian", alpha=0.3, temperature=2.0,
                                 jacobian_method=method)
    got, targets = training_objective(student, teacher, train_x, IDX, cfg)
    assert "jacobian" in targets  # precomputed once, as in training
    x = train_x[IDX]
    expected = 0.7 * naive_kl(student(x), teacher(x), 2.0, t2=False) + \
        0.3 * naive_loss(student, teacher, x)
    assert_same_loss_and_student_grads(got, expected, student)


@pytest.mark.parametrize("loss", ["kl", "jacobian", "contrastive"])
@pytest.mark.parametrize("t2,mixture_t2", [(True, False), (False, True)])
def test_t2_scales_plain_kl_and_a_mixture_only_when_asked(loss, t2, mixture_t2):
    """Hinton's T^2 belongs to plain KL (t2); inside a mixture it would outweigh alpha, so
    the mixture's KL term carries it only with mixture_t2."""
    student, teacher = models()[0]
    train_x = inputs(0)
    cfg = harness.DistillSettings(loss=loss, alpha=0.3, temperature=3.0, t2=t2,
                                 mixture_t2=mixture_t2)
    targets = common.teacher_targets(teacher, train_x, common.LOSSES[loss].needs, method="loop")
    heads = common.ContrastiveHeads(student.features(train_x[:1]).shape[1],
                                    targets["features"].shape[1], 8) \
        if loss == "contrastive" else None
    terms = common.distillation_objective(student, teacher, targets, cfg, heads)(
        train_x[IDX], torch.zeros(4).long(), IDX)
    x = train_x[IDX]
    weight, value = terms["kl"]
    assert weight == pytest.approx(1.0 if loss == "kl" else 0.7)
    expected_t2 = t2 if loss == "kl" else mixture_t2
    assert value.item() == pytest.approx(
        naive_kl(student(x), teacher(x), 3.0, t2=expected_t2).item(), rel=1e-5)


def test_teacher_jacobians_too_large_to_precompute_are_computed_per_batch():
    student, teacher = models()[0]
    train_x = inputs(0)
    cfg = harness.DistillSettings(loss="jacobian", alpha=1.0)
    got, targets = training_objective(student, teacher, train_x, IDX, cfg, max_bytes=0)
    assert "jacobian" not in targets
    assert_same_loss_and_student_grads(got, naive_loss(student, teacher, train_x[IDX]), student)


def test_training_objective_top_k_matches_naive_rows():
    student, teacher = models()[0]
    train_x = inputs(0)
    x = train_x[IDX]
    cfg = harness.DistillSettings(loss="jacobian", alpha=1.0, top_k=3)
    got, _ = training_objective(student, teacher, train_x, IDX, cfg)
    expected = naive_loss(student, teacher, x, rows=teacher(x).topk(3, dim=1).indices)
    assert_same_loss_and_student_grads(got, expected, student)
    all_rows, _ = training_objective(student, teacher, train_x, IDX,
                                     harness.DistillSettings(loss="jacobian", alpha=1.0))
    assert got.item() != pytest.approx(all_rows.item(), abs=1e-4)


def test_training_objective_projection_matches_naive_projected_rows():
    student, teacher = models()[0]
    train_x = inputs(0)
    x = train_x[IDX]
    cfg = harness.DistillSettings(loss="jacobian", alpha=1.0, jacobian_estimator="projection",
                                 projections=2)
    got, _ = training_objective(student, teacher, train_x, IDX, cfg,
                                generator=torch.Generator().manual_seed(7))
    v = common.projection_selectors(2, len(x), 7, torch.device("cpu"),
                                    torch.Generator().manual_seed(7))
    js = torch.einsum("kbc,bcd->bkd", v, naive_jacobian(student, x, True))
    jt = torch.einsum("kbc,bcd->bkd", v, naive_jacobian(teacher, x, False)).detach()
    assert_same_loss_and_student_grads(got, common.jacobian_distance(js, jt), student)


def test_jacobian_term_is_zero_for_a_copy_of_the_teacher():
    _, teacher = models()[0]
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    loss, _ = training_objective(student, teacher, inputs(0), IDX,
                                 harness.DistillSettings(loss="jacobian", alpha=1.0))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert all(torch.isfinite(g).all() for g in grads(loss, student))  # no NaN from the norm at 0


@pytest.mark.parametrize("arch,size", [("cnn", 13), ("cnn", 9), ("lenet", 12), ("lenet", 15)])
def test_explicit_backward_pass_matches_autograd(arch, size):
    """input_vjp of the small CNN and of LeNet against autograd: rows and their parameter
    gradients, odd map sizes too."""
    torch.manual_seed(3)
    model = common.build_model(arch, 3, 5, 4, (size, size))
    x = torch.rand(4, 3, size, size)
    sel = common.projection_selectors(3, 4, 5, torch.device("cpu"),
                                      torch.Generator().manual_seed(0))
    logits_auto, rows_auto = common.input_jacobian(model, x, sel, create_graph=True, method="loop")
    logits_expl, rows_expl = common.input_jacobian(model, x, sel, create_graph=True,
                                                   method="explicit")
    assert torch.allclose(logits_expl, logits_auto, atol=1e-6)
    assert torch.allclose(rows_expl, rows_auto, atol=1e-6, rtol=1e-5)
    target = torch.randn_like(rows_auto)
    for g_expl, g_auto in zip(grads((rows_expl * target).sum(), model),
                              grads((rows_auto * target).sum(), model)):
        assert torch.allclose(g_expl, g_auto, atol=1e-5, rtol=1e-4)
    _, rows_nograd = common.input_jacobian(model, x, sel, create_graph=False, method="explicit")
    assert not rows_nograd.requires_grad and \
        torch.allclose(rows_nograd, rows_auto, atol=1e-6, rtol=1e-5)


def test_explicit_method_needs_the_small_cnn():
    student, _ = models()[1]  # the MLP has no input_vjp
    with pytest.raises(common.UserError, match="explicit needs the small CNN"):
        common.input_jacobian(student, torch.rand(2, 2, 5, 5),
                              common.class_selectors(7, 2, torch.device("cpu")),
                              create_graph=True, method="explicit")
    assert common.default_jacobian_method(torch.device("cpu"), student) == "loop"
    assert common.default_jacobian_method(torch.device("cpu"), models()[0][0]) == "explicit"


def test_projected_rows_are_projections_of_the_full_jacobian():
    student, _ = models()[0]
    x = torch.rand(3, 2, 12, 12)
    full = naive_jacobian(student, x, False)  # [B, C, D]
    v = common.projection_selectors(4, 3, 7, torch.device("cpu"), torch.Generator().manual_seed(1))
    _, rows = common.input_jacobian(student, x, v, create_graph=False)
    assert torch.allclose(rows, torch.einsum("kbc,bcd->bkd", v, full), atol=1e-5)
    # E ||V J||^2 = ||J||^2 with the 1/sqrt(K) scaling: check on many draws
    v = common.projection_selectors(2000, 3, 7, torch.device("cpu"),
                                    torch.Generator().manual_seed(2))
    ratio = torch.einsum("kbc,bcd->bkd", v, full).pow(2).sum((1, 2)) / full.pow(2).sum((1, 2))
    assert torch.allclose(ratio, torch.ones(3), atol=0.1)


def test_kd_kl_against_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()
    hand = np.mean([np.sum(softmax(ti / T) * (np.log(softmax(ti / T)) - np.log(softmax(si / T))))
                    for si, ti in zip(s.numpy(), t.numpy())])
    assert common.kd_kl(s, t, T, t2=False).item() == pytest.approx(hand, rel=1e-5)
    assert common.kd_kl(s, t, T, t2=True).item() == pytest.approx(hand * T * T, rel=1e-5)
    assert common.kd_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce_lower_for_aligned_features():
    torch.manual_seed(0)
    heads = common.ContrastiveHeads(16, 16, dim=16)
    with torch.no_grad():
        heads.student.weight.copy_(torch.eye(16)), heads.teacher.weight.copy_(torch.eye(16))
        heads.student.bias.zero_(), heads.teacher.bias.zero_()
    teacher_features = torch.randn(32, 16)
    aligned = common.info_nce(teacher_features + 0.01 * torch.randn(32, 16), teacher_features,
                              heads)
    shuffled = common.info_nce(teacher_features[torch.randperm(32)], teacher_features, heads)
    assert aligned.item() < 0.5 * shuffled.item()
    assert aligned.item() >= 0.0
    # the heads get gradients (they are trained with the student)
    common.info_nce(torch.randn(8, 16), torch.randn(8, 16), heads).backward()
    assert heads.student.weight.grad.abs().sum() > 0 and heads.teacher.weight.grad.abs().sum() > 0


def test_info_nce_same_class_negatives_by_hand():
    torch.manual_seed(1)
    heads = common.ContrastiveHeads(6, 5, dim=4)
    fs, ft = torch.randn(4, 6), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 0, 1])
    zs = F.normalize(heads.student(fs), dim=1)
    zt = F.normalize(heads.teacher(ft), dim=1)
    sim = (zs @ zt.t() / 0.1).detach()
    by_hand = 0.0
    # each direction: softmax of the positive against the same-label samples only
    for i in range(4):
        same = (labels == labels[i]).nonzero().flatten()
        by_hand += 0.5 * (-(sim[i, i] - torch.logsumexp(sim[i, same], 0))
                          - (sim[i, i] - torch.logsumexp(sim[same, i], 0)))
    got = common.info_nce(fs, ft, heads, 0.1, labels)
    assert got.item() == pytest.approx(by_hand.item() / 4, rel=1e-5)
    # one class: every sample is a negative
    assert common.info_nce(fs, ft, heads, 0.1, torch.zeros(4)).item() == pytest.approx(
        common.info_nce(fs, ft, heads, 0.1).item(), rel=1e-6)
    alone = common.info_nce(fs, ft, heads, 0.1, torch.arange(4))  # no negatives at all: log 1
    assert alone.item() == pytest.approx(0.0, abs=1e-6)
    alone.backward()  # and no NaN from the masked entries
    assert all(torch.isfinite(p.grad).all() for p in heads.parameters() if p.grad is not None)


def test_info_nce_bank_negatives_by_hand():
    """Bank features are extra negatives for each student sample; the other direction stays
    in-batch."""
    torch.manual_seed(2)
    heads = common.ContrastiveHeads(6, 5, dim=4)
    fs, ft, bank = torch.randn(4, 6), torch.randn(4, 5), torch.randn(7, 5)
    zs = F.normalize(heads.student(fs), dim=1)
    zt = F.normalize(heads.teacher(torch.cat([ft, bank])), dim=1)
    sim = (zs @ zt.t() / 0.1).detach()
    by_hand = sum(0.5 * (-(sim[i, i] - torch.logsumexp(sim[i], 0))
                         - (sim[i, i] - torch.logsumexp(sim[:4, i], 0)))
                  for i in range(4)) / 4
    assert common.info_nce(fs, ft, heads, 0.1, bank_features=bank).item() == \
        pytest.approx(by_hand.item(), rel=1e-5)
    assert common.info_nce(fs, ft, heads, 0.1, bank_features=bank).item() > \
        common.info_nce(fs, ft, heads, 0.1).item()


def test_dataset_negatives_come_from_outside_the_batch():
    """The objective's bank holds other training rows than the batch's, at most contrastive_bank
    of them."""
    student, teacher = models()[0]
    train_x = inputs(0)
    seen = []
    real = common.info_nce

    def spy(*args, **kw):
        seen.append(args[5] if len(args) > 5 else kw.get("bank_features"))
        return real(*args, **kw)
    targets = common.teacher_targets(teacher, train_x, ("logits", "features"), method="loop")
    heads = common.ContrastiveHeads(student.feature_dim, teacher.feature_dim, 8)
    for bank_size, expected in ((3, 3), (100, len(train_x) - len(IDX))):
        cfg = harness.DistillSettings(loss="contrastive", contrastive_negatives="dataset",
                                     contrastive_bank=bank_size)
        objective = common.distillation_objective(student, teacher, targets, cfg, heads,
                                                  torch.Generator().manual_seed(0))
        try:
            common.info_nce = spy
            objective(train_x[IDX], torch.zeros(4).long(), IDX)
        finally:
            common.info_nce = real
        bank = seen[-1]
        assert len(bank) == expected
        batch_rows = {tuple(r.tolist()) for r in targets["features"][IDX]}
        assert not batch_rows & {tuple(r.tolist()) for r in bank}


def test_pair_metrics_by_hand():
    y = torch.tensor([0, 1, 2, 1])
    teacher = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [5.0, 0, 0]])
    student = torch.tensor([[4.0, 0, 0], [0, 0, 4.0], [0, 4.0, 0], [4.0, 0, 0]])
    group = torch.tensor([0, 0, 1, 1])
    m = common.pair_metrics(student, teacher, y, group)
    assert m["acc"] == pytest.approx(0.25)          # only sample 0 is right
    assert m["agreement"] == pytest.approx(0.75)    # samples 0, 2, 3 agree with the teacher
    hand_kl = np.mean([F.kl_div(F.log_softmax(s, 0), F.log_softmax(t, 0), log_target=True,
                                reduction="sum").item()
                       for s, t in zip(student, teacher)])
    assert m["kl"] == pytest.approx(hand_kl, rel=1e-5)
    assert m["groups"] == {"0": 0.5, "1": 0.0}
    assert m["worst_group_acc"] == 0.0 and m["mean_group_acc"] == pytest.approx(0.25)
    assert m["group_agreement"] == {"0": 0.5, "1": 1.0}
    # the average weighted by the training set's group shares, over the groups the set has
    weighted = harness.weigh_groups(dict(m), {"0": 0.9, "1": 0.05, "2": 0.05})
    assert weighted["avg_acc"] == pytest.approx((0.9 * 0.5 + 0.05 * 0.0) / 0.95)


def test_parse_config():
    assert common.parse_config("IA", "IA") == {"I": "label", "A": "label"}
    assert common.parse_config("I+rA", "IA") == {"I": "label", "A": "random"}
    assert common.parse_config("rI+A", "IA") == {"I": "random", "A": "label"}
    assert common.parse_config("A", "IAB") == {"I": "absent", "A": "label", "B": "absent"}
    for bad in ("IB", "rA", "II", "I+", "", "ia"):
        with pytest.raises(common.UserError):
            common.parse_config(bad, "IA")


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.95, 1.0])
def test_spurious_values_exact_fraction(frac):
    y = torch.randint(10, (1000,), generator=torch.Generator().manual_seed(0))
    cue = common.spurious_values(y, frac, 10, torch.Generator().manual_seed(1))
    assert (cue == y).sum().item() == round(frac * 1000)
    assert cue.min() >= 0 and cue.max() < 10


def test_nan_loss_stops_with_a_message():
    class NaNNet(common.SmallCNN):
        def forward(self, x):
            return super().forward(x) * math.nan
    teacher = common.freeze(common.SmallCNN(3, 10, 4))
    train = common.TensorSet(torch.rand(16, 3, 8, 8), torch.randint(10, (16,)))
    with pytest.raises(common.UserError, match="NaN|nan"):
        common.distill(NaNNet(3, 10, 4), teacher, train,
                       harness.DistillSettings(loss="kl", steps=3, batch_size=8),
                       torch.device("cpu"))


def test_distill_keeps_teacher_frozen_and_trains_heads(monkeypatch):
    created = []

    class SpyHeads(common.ContrastiveHeads):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(copy.deepcopy(self.state_dict()))
    monkeypatch.setattr(common, "ContrastiveHeads", SpyHeads)
    torch.manual_seed(0)
    teacher = common.SmallCNN(3, 10, 4)
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    student = common.SmallCNN(3, 10, 4)
    train = common.TensorSet(torch.rand(32, 3, 8, 8), torch.randint(10, (32,)))
    settings = harness.DistillSettings(loss="contrastive", steps=4, batch_size=8, lr=1e-2)
    run = common.distill(student, teacher, train, settings, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(created) == 1  # created once, not at every step
    trained = run["aux"].state_dict()
    assert not torch.equal(created[0]["student.weight"], trained["student.weight"])
    assert not torch.equal(created[0]["teacher.weight"], trained["teacher.weight"])


def test_curves_record_each_term_with_its_weight_value_and_gradient_norm():
    torch.manual_seed(0)
    teacher = common.freeze(common.SmallCNN(3, 10, 4))
    student = common.SmallCNN(3, 10, 4)
    train = common.TensorSet(torch.rand(16, 3, 8, 8), torch.randint(10, (16,)))
    cfg = harness.DistillSettings(loss="jacobian", alpha=0.3, steps=2, batch_size=8, eval_every=2)
    run = common.distill(student, teacher, train, cfg, torch.device("cpu"),
                         test_sets={"all": train}, log=lambda m: None)
    terms = run["curves"][-1]["terms"]
    assert set(terms) == {"kl", "jacobian"}
    assert terms["kl"]["weight"] == pytest.approx(0.7) and \
        terms["jacobian"]["weight"] == pytest.approx(0.3)
    assert run["curves"][-1]["loss"] == pytest.approx(0.7 * terms["kl"]["value"]
                                                      + 0.3 * terms["jacobian"]["value"],
                                                      rel=1e-5)
    assert all(t["grad_norm"] > 0 and math.isfinite(t["grad_norm"]) for t in terms.values())


def test_term_gradient_norms_by_hand():
    student, teacher = models()[0]
    train_x = inputs(0)
    cfg = harness.DistillSettings(loss="jacobian", alpha=0.3)
    targets = common.teacher_targets(teacher, train_x, ("logits", "jacobian"))
    terms = common.distillation_objective(student, teacher, targets, cfg)(train_x[IDX], None, IDX)
    norms = common.term_grad_norms(terms, list(student.parameters()))
    for name, (weight, value) in terms.items():
        by_hand = torch.cat([g.flatten()
                             for g in torch.autograd.grad(weight * value,
                                                          list(student.parameters()),
                                                          retain_graph=True, allow_unused=True)
                             if g is not None]).norm().item()
        assert norms[name] == pytest.approx(by_hand, rel=1e-5) and by_hand > 0
    common.total_loss(terms).backward()  # the graph is still there for the update


@pytest.mark.parametrize("shift", [1, 2])
def test_shifted_moves_each_image_by_its_own_offset_within_the_bound(shift):
    """Every output image is its input moved by some (dy, dx) with |dy|, |dx| <= shift and zeros
    where nothing moved in; the offsets differ between images; shift 0 changes nothing."""
    b, c, h, w = 64, 3, 6, 7
    x = torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)
    out = common.shifted(x, shift, torch.Generator().manual_seed(0))
    padded = F.pad(x, (shift,) * 4)
    offsets = set()
    for i in range(b):
        found = [(dy, dx) for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 1
    assert torch.equal(common.shifted(x, 0, torch.Generator().manual_seed(0)), x)
    again = common.shifted(x, shift, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)


def test_warmup_ramps_the_learning_rate_then_follows_the_cosine():
    settings = harness.DistillSettings(steps=100, lr=0.01, min_lr_frac=0.1)
    plain = common._optimizer([nn.Parameter(torch.zeros(1))], settings, "adam")
    warm = common._optimizer([nn.Parameter(torch.zeros(1))],
                             harness.DistillSettings(steps=100, lr=0.01, min_lr_frac=0.1,
                                                     warmup=10), "adam")
    lrs = {"plain": [], "warm": []}
    for _ in range(100):
        for name, (opt, sched) in (("plain", plain), ("warm", warm)):
            lrs[name].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    # linear from lr / 11 up to the cosine over the first 10 steps, then exactly the cosine
    assert lrs["warm"][0] == pytest.approx(0.01 / 11 * (0.1 + 0.9 * (1 + math.cos(0)) / 2))
    assert all(a < b for a, b in zip(lrs["warm"][:10], lrs["warm"][1:11]))
    assert lrs["warm"][10:] == pytest.approx(lrs["plain"][10:], rel=1e-6)
    assert lrs["warm"][:10] < lrs["plain"][:10]


def test_channels_last_changes_the_memory_layout_not_the_training():
    """The same student trained with and without --channels-last ends at the same weights up to
    float rounding: the layout is how convolutions run, not what they compute."""
    torch.manual_seed(0)
    teacher = common.freeze(common.SmallCNN(3, 10, 4))
    train = common.TensorSet(torch.rand(32, 3, 16, 8), torch.randint(10, (32,)))
    ends = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        student = common.SmallCNN(3, 10, 4)
        settings = harness.DistillSettings(loss="jacobian", alpha=0.5, steps=5, batch_size=8,
                                           lr=1e-3)
        common.distill(student, teacher, train, settings, torch.device("cpu"),
                       log=lambda m: None, channels_last=channels_last)
        conv = student.body[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        ends.append({k: v.detach().contiguous() for k, v in student.state_dict().items()})
    assert all(torch.allclose(ends[0][k], ends[1][k], atol=1e-5) for k in ends[0])


def test_explicit_rows_of_a_channels_last_model_equal_autograd():
    torch.manual_seed(0)
    model = common.SmallCNN(3, 10, 4)
    x = torch.rand(4, 3, 16, 8)
    sel = common.class_selectors(10, 4, torch.device("cpu"))
    _, expected = common.input_jacobian(model, x, sel, create_graph=False, method="loop")
    common.in_format(model, True)
    _, rows = common.input_jacobian(model, x, sel, create_graph=False, method="explicit")
    assert torch.allclose(rows, expected, atol=1e-5)


def test_kappa_and_error_consistency_correct_agreement_for_chance():
    a = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    assert common.cohen_kappa(a, a, 3) == pytest.approx(1.0)
    b = torch.tensor([0, 1, 1, 1, 2, 0, 0, 2])
    # p_o = 5/8; P(a) = (3, 3, 2)/8, P(b) = (3, 3, 2)/8 -> p_e = 22/64
    assert common.cohen_kappa(a, b, 3) == pytest.approx((5 / 8 - 22 / 64) / (1 - 22 / 64))
    assert common.cohen_kappa(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                              3) == 0.0
    right_a = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    right_b = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    # p_a = 5/8, p_b = 4/8, c_obs = 5/8, c_exp = 20/64 + 12/64
    assert common.error_consistency(right_a, right_b) == pytest.approx(
        (5 / 8 - 32 / 64) / (1 - 32 / 64))
    assert common.error_consistency(right_a, right_a) == pytest.approx(1.0)


def test_cka_and_procrustes_know_features_equal_up_to_rotation():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    assert common.linear_cka(x, x) == pytest.approx(1.0)
    assert common.linear_cka(x, 3 * x @ rotation + 1) == pytest.approx(1.0)
    assert common.procrustes_distance(x, 3 * x @ rotation + 1) == pytest.approx(0.0, abs=1e-6)
    # features of another width that hold the same information: x rotated, then zero-padded
    padded = torch.cat([x @ rotation, torch.zeros(200, 8)], 1)
    assert common.linear_cka(x, padded) == pytest.approx(1.0)
    unrelated = torch.randn(200, 16)
    assert common.linear_cka(x, unrelated) < 0.2
    assert common.procrustes_distance(x, unrelated) > 1.0
    # one direction of x lost: CKA barely moves when it is a small one, Procrustes does
    scale = torch.ones(16)
    scale[0] = 0.3
    lost = (x * scale).clone()
    lost[:, 0] = 0
    assert common.linear_cka(x * scale, lost) > 0.99
    assert common.procrustes_distance(x * scale, lost) > 0.05


class ReadsOnly(nn.Module):
    """A model that reads one part of its input: logits = W . part(x), a known answer for
    saliency."""

    def __init__(self, part, size):
        super().__init__()
        self.part = part
        self.weight = nn.Parameter(torch.randn(size, 10))

    def forward(self, x):
        return self.part(x).flatten(1) @ self.weight


def test_a_model_that_reads_only_the_patch_puts_all_its_saliency_there():
    import exp_cifar_patch
    regions = exp_cifar_patch.cue_regions(64, 32)
    assert regions["B"][:32].all() and not regions["B"][32:].any()
    assert regions["A"][:32].sum() == 0 and regions["A"].sum() == 10 * 8 * 8
    torch.manual_seed(0)
    x, y = torch.rand(20, 3, 64, 32), torch.randint(10, (20,))
    patch = ReadsOnly(lambda x: x * regions["A"], 3 * 64 * 32)
    top = ReadsOnly(lambda x: x * regions["B"], 3 * 64 * 32)
    cues = {k: common.on_pixels(m) for k, m in regions.items()}
    sets = {"IAB": common.TensorSet(x, y)}
    look = common.saliency_metrics(common.look_of(patch, sets, cues),
                                   common.look_of(top, sets, cues))["IAB"]
    assert look["student"]["A"] == pytest.approx(1.0) and look["student"]["B"] == 0
    assert look["teacher"]["B"] == pytest.approx(1.0) and look["teacher"]["A"] == 0
    assert look["cosine"] == pytest.approx(0.0, abs=1e-6)  # they look at disjoint pixels
    everywhere = ReadsOnly(lambda x: x, 3 * 64 * 32)
    share = common.region_share(common.class_saliency(everywhere, x, y), regions["B"])
    assert 0.3 < float(share.mean()) < 0.7  # about the top half's share of the pixels
    # a cue whose pixels differ per image (Waterbirds' background): each image names its own
    own = torch.rand(20, 64, 32) < 0.5
    reader = ReadsOnly(lambda x: x * own[:, None], 3 * 64 * 32)
    sets, cues = {"I+rA": common.TensorSet(x, y, region=own.float())}, {"A": common.on_own_pixels}
    look = common.saliency_metrics(common.look_of(reader, sets, cues),
                                   common.look_of(everywhere, sets, cues))["I+rA"]
    assert look["student"]["A"] == pytest.approx(1.0)
    assert 0.3 < look["teacher"]["A"] < 0.7


def test_colour_share_separates_colour_from_brightness():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 6, 6), torch.randint(10, (8,))
    colour = ReadsOnly(lambda x: x - x.mean(1, keepdim=True), 3 * 36)
    grey = ReadsOnly(lambda x: x.mean(1, keepdim=True), 36)
    assert common.chroma_share(common.class_saliency(colour, x, y)) == pytest.approx(
        torch.ones(8))
    assert common.chroma_share(common.class_saliency(grey, x, y)) == pytest.approx(
        torch.zeros(8), abs=1e-6)
