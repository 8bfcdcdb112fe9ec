"""Every data set has its own random stream: changing one set (the teacher's configuration, the
list of test sets) leaves every other set bit-identical; validation images are never test images.
"""
import pytest
import torch

import exp_cifar_patch as cifar
import exp_colored_mnist as cm
import exp_waterbirds as wb
import harness


def digests(data: harness.Data) -> dict[str, str]:
    """One digest per set of a run's data, by role (and test set name)."""
    out = {role: harness.digest(*getattr(data, role)) for role in
           ("teacher_train", "student_train", "teacher_validation", "student_validation")}
    out.update({f"test/{name}": harness.digest(*s) for name, s in data.test_sets.items()})
    return out


def quiet(*a):
    pass


def test_a_stream_depends_on_seed_and_name_only():
    draw = lambda seed, name: torch.rand(5, generator=harness.stream(seed, name))  # noqa: E731
    assert torch.equal(draw(0, "train/IA"), draw(0, "train/IA"))
    assert not torch.equal(draw(0, "train/IA"), draw(1, "train/IA"))
    assert not torch.equal(draw(0, "train/IA"), draw(0, "train/I+rA"))


EXPERIMENTS = [
    (cm, ["--smoke"], "I+rA", "IA", "rI+A"),
    (cifar, ["--smoke"], "I", "IA", "I+rA"),
    (cifar, ["--smoke", "--dominoes"], "IB", "IAB", "A"),
    (wb, ["--smoke"], "I+rA", "IA", "I"),
]


@pytest.mark.parametrize("exp, flags, teacher, student, other", EXPERIMENTS,
                         ids=["colored_mnist", "cifar_patch", "dominoes", "waterbirds"])
def test_the_teachers_configuration_changes_only_the_teachers_sets(exp, flags, teacher, student,
                                                                    other):
    base = ["--student-config", student] + flags
    a = digests(exp.make_data(exp.parse_args(base + ["--teacher-config", teacher]), log=quiet))
    b = digests(exp.make_data(exp.parse_args(base + ["--teacher-config", other]), log=quiet))
    changed = {k for k in a if a[k] != b[k]}
    assert changed == {"teacher_train", "teacher_validation"}


@pytest.mark.parametrize("exp, flags", [(cm, ["--smoke"]), (cifar, ["--smoke", "--dominoes"])],
                         ids=["colored_mnist", "dominoes"])
def test_adding_or_removing_a_test_set_leaves_the_others_bit_identical(exp, flags):
    args = exp.parse_args(flags)
    every = exp.make_data(args, log=quiet)
    names = list(every.test_sets)
    fewer = exp.make_data(args, tuple(names[1:]), log=quiet)  # the first set removed
    a, b = digests(every), digests(fewer)
    assert set(a) - set(b) == {f"test/{names[0]}"}
    assert all(a[k] == b[k] for k in b)


def test_the_seed_changes_the_training_sets_only():
    a = digests(cm.make_data(cm.parse_args(["--smoke"]), log=quiet))
    b = digests(cm.make_data(cm.parse_args(["--smoke", "--seed", "1"]), log=quiet))
    changed = {k for k in a if a[k] != b[k]}  # IA has no random draw: the same for every seed
    assert "teacher_train" in changed and changed <= {"teacher_train", "student_train"}


def test_validation_digits_are_neither_training_nor_test_digits():
    train_x, train_y, test_x, _ = harness.sklearn_digits(28)
    fit_x, _, val_x, _ = harness.hold_out(train_x, train_y, len(train_y) // 6)
    rows = lambda x: {t.numpy().tobytes() for t in x}  # noqa: E731
    assert len(val_x) == len(train_y) // 6 and len(fit_x) + len(val_x) == len(train_y)
    assert not rows(val_x) & rows(fit_x) and not rows(val_x) & rows(test_x)


def test_generated_validation_images_are_not_test_images():
    for exp, flags in ((cifar, ["--smoke"]), (wb, ["--smoke"])):
        data = exp.make_data(exp.parse_args(flags), log=quiet)
        val = {t.numpy().tobytes() for t in data.student_validation.x}
        for s in data.test_sets.values():
            assert not val & {t.numpy().tobytes() for t in s.x}
