"""torch.optim's contract, as PyTorch's own generic optimizer tests state it, over every gradproj optimizer.

Each test runs one behaviour over every configuration of one preset (``tests/optim_db.py``: torch's
``OptimizerInfo``/``OptimizerInput`` entries for our optimizers, each with ``foreach`` False, None and, where
the fast path takes it, True), as ``TestOptimRenewed`` in pytorch's ``test/test_optim.py`` does for torch's
own. The tests are ours; the behaviours are torch's: loss goes down with and without schedulers, on strided
parameters as on contiguous ones (and nothing outside a view is written), tensor ``lr``, per-group
isolation, no-op steps, printing, deterministic and ``weights_only`` state dicts, older state dicts,
deep copies and pickles that continue in lockstep, the hooks, closures, gradients never written into,
and the refusals (each naming the bad value).
"""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Callable, Iterator

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, OptimizerInfo, OptimizerInput

from conftest import state_equal
from gradproj.optim.spikes import police, policed
from optim_db import OPTIM_DB, construct, ids

pytestmark = pytest.mark.parametrize("info", OPTIM_DB, ids=ids(OPTIM_DB))

Closure = Callable[[], torch.Tensor]


def _inputs(info: OptimizerInfo) -> list[OptimizerInput]:
    return list(info.optim_inputs_func("cpu"))


def _weight_and_bias(contiguous: bool = True, seed: int = 0) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """torch's small problem: a (10, 5) weight and a (10,) bias; strided views of larger tensors if not
    ``contiguous`` (:func:`_strided`)."""
    if not contiguous:
        return _strided(seed)[0]
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(10, 5, generator=gen)), torch.nn.Parameter(torch.randn(10, generator=gen))


def _strided(seed: int = 0) -> tuple[tuple[torch.nn.Parameter, torch.nn.Parameter], list[torch.Tensor]]:
    """A weight and a bias that are every other element of the last dimension of larger tensors, and those
    tensors (a Parameter of a view shares its storage)."""
    gen = torch.Generator().manual_seed(seed)
    storages = [torch.randn(10, 5, 2, generator=gen), torch.randn(10, 2, generator=gen)]
    weight, bias = (torch.nn.Parameter(t[..., 0]) for t in storages)
    assert not weight.is_contiguous() and not bias.is_contiguous()
    assert weight.data_ptr() == storages[0].data_ptr()
    return (weight, bias), storages


def _closure(opt: torch.optim.Optimizer, weight: torch.Tensor, bias: torch.Tensor) -> Closure:
    x = torch.linspace(-1, 1, 5)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    return closure


def _grads(params: list[torch.Tensor], steps: int, seed: int = 1) -> Iterator[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [torch.randn(p.shape, generator=gen) for p in params]


def _step_with(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.step()


# ------------------------------------------------------------------------------------------- direction
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("schedulers", [False, True], ids=["", "with_lr_schedulers"])
def test_loss_goes_down(info: OptimizerInfo, contiguous: bool, schedulers: bool) -> None:
    """torch's ``test_forloop_goes_right_direction``: 20 closure steps lower the loss, with each of the entry's
    scheduler sets stepping beside it (ReduceLROnPlateau on the loss the closure returned)."""
    for optim_input in _inputs(info):
        for make_schedulers in info.scheduler_inputs if schedulers else [[]]:
            weight, bias = _weight_and_bias(contiguous)
            opt = construct(info, [weight, bias], optim_input)
            attached = [make(opt) for make in make_schedulers]
            closure = _closure(opt, weight, bias)
            initial = closure().item()
            for _ in range(20):
                loss = opt.step(closure)
                for scheduler in attached:
                    scheduler.step(loss.item()) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
            assert closure().item() < initial, f"{optim_input.desc}: {closure().item()} >= {initial}"


def test_strided_parameters_step_as_contiguous_ones_and_only_inside_their_view(info: OptimizerInfo) -> None:
    """A parameter that is a view of a larger tensor steps as a contiguous copy of it would, on every path
    (fused or not), and the elements between its strides are never written."""
    for optim_input in _inputs(info):
        strided, storages = _strided()
        dense = [torch.nn.Parameter(p.detach().contiguous()) for p in strided]
        outside = [t[..., 1].clone() for t in storages]  # the other half of each storage
        opts = [construct(info, list(ps), optim_input) for ps in (dense, strided)]
        for grads in _grads(list(dense), 5):
            _step_with(opts[0], list(dense), grads)
            _step_with(opts[1], list(strided), grads)
        for d, s, storage, kept in zip(dense, strided, storages, outside, strict=True):
            assert torch.equal(storage[..., 1], kept), f"{optim_input.desc}: wrote outside the view"
            torch.testing.assert_close(s.detach(), d.detach(), rtol=1e-5, atol=1e-6, msg=optim_input.desc)


# ------------------------------------------------------------------------------------------------ lr
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-d", "1-element", "1x1"])
def test_tensor_lr_steps_as_its_number(info: OptimizerInfo, shape: tuple[int, ...]) -> None:
    """A 1-element tensor ``lr`` is taken (as torch's Adam/AdamW take it), stays the group's tensor while a
    scheduler fills it, and steps as the same number would."""
    for optim_input in _inputs(info):
        lr = torch.full(shape, 0.01)
        runs = []
        for value in (lr, float(lr)):
            weight, bias = _weight_and_bias()
            opt = construct(info, [weight, bias], optim_input, lr=value)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
            for grads in _grads([weight, bias], 4):
                _step_with(opt, [weight, bias], grads)
                scheduler.step()
            runs.append((opt, weight, bias))
        (tensor_opt, *tensor_params), (_, *float_params) = runs
        assert tensor_opt.param_groups[0]["lr"] is lr, optim_input.desc
        for a, b in zip(tensor_params, float_params, strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), msg=optim_input.desc)


@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_a_groups_options_move_only_that_group(info: OptimizerInfo, key: str) -> None:
    """Two runs that differ only in one group's ``lr`` (or ``weight_decay``) give the other group the same
    weights bit for bit, and that group different ones."""
    for optim_input in _inputs(info):
        finals = []
        for value in (0.01, 0.02) if key == "lr" else (0.0, 0.5):
            weight, bias = _weight_and_bias()
            opt = construct(info, [weight, bias], optim_input, split=True)
            group_of_bias = opt.param_groups[1]
            group_of_bias[key] = value
            for grads in _grads([weight, bias], 4):
                _step_with(opt, [weight, bias], grads)
            finals.append((weight.detach(), bias.detach()))
        (w1, b1), (w2, b2) = finals
        assert torch.equal(w1, w2), f"{optim_input.desc}: the weight's group moved with the bias' {key}"
        assert not torch.equal(b1, b2), f"{optim_input.desc}: the bias' {key} changed nothing"


# ----------------------------------------------------------------------------------------- no-op steps
def test_step_without_gradients_changes_nothing(info: OptimizerInfo) -> None:
    for optim_input in _inputs(info):
        weight, bias = _weight_and_bias()
        before = [weight.detach().clone(), bias.detach().clone()]
        opt = construct(info, [weight, bias], optim_input)
        opt.step()
        assert torch.equal(weight, before[0]) and torch.equal(bias, before[1]), optim_input.desc
        assert not any(opt.state[p] for p in (weight, bias)), f"{optim_input.desc}: state without a gradient"


def test_zero_gradients_without_decay_change_nothing(info: OptimizerInfo) -> None:
    """torch's ``test_step_is_noop_for_zero_grads``: a zero gradient (an expert that got no tokens, a frozen
    row) moves no weight, on refresh steps too; decay aside. A weight-normalised matrix (GradNormLoRP) is
    rebuilt as ``g v / ||v||`` every step, so it may move by that product's rounding (under an ulp)."""
    reparametrised = info.optim_cls.projection_defaults()["weight_norm"]
    for optim_input in _inputs(info):
        if optim_input.kwargs.get("weight_decay"):
            continue
        weight, bias = _weight_and_bias()
        before = [weight.detach().clone(), bias.detach().clone()]
        opt = construct(info, [weight, bias], optim_input)
        for _ in range(4):
            _step_with(opt, [weight, bias], [torch.zeros_like(weight), torch.zeros_like(bias)])
        rtol = 2 * torch.finfo(torch.float32).eps if reparametrised and "rank" in optim_input.kwargs else 0.0
        torch.testing.assert_close(weight.detach(), before[0], rtol=rtol, atol=0, msg=optim_input.desc)
        assert torch.equal(bias, before[1]), optim_input.desc


def test_gradients_are_never_written_into(info: OptimizerInfo) -> None:
    """torch's ``test_grads_are_never_inplaced_into``: ``p.grad`` after a step is what backward left. The one
    documented exception is a gradient policy (``spike_policy``), which clips the gradient in place as
    ``torch.nn.utils.clip_grad_norm_`` does, so that no copy of every gradient is held: there ``p.grad``
    is what the policy passed on (:func:`gradproj.optim.spikes.police` replayed on a copy)."""
    for optim_input in _inputs(info):
        weight, bias = _weight_and_bias()
        opt = construct(info, [weight, bias], optim_input)
        replayed: dict[int, dict] = {0: {}, 1: {}}  # type: ignore[type-arg]
        for grads in _grads([weight, bias], 4):
            for p, g in zip((weight, bias), grads, strict=True):
                p.grad = g.clone()
            opt.step()
            for i, (p, g) in enumerate(zip((weight, bias), grads, strict=True)):
                group = next(group for group in opt.param_groups if any(q is p for q in group["params"]))
                if policed(group):
                    police(g, replayed[i], group)  # what the policy makes of this gradient, in place
                assert torch.equal(p.grad, g), f"{optim_input.desc}: the step wrote into a gradient"


def test_step_returns_the_closures_loss_computed_with_grad_enabled(info: OptimizerInfo) -> None:
    for optim_input in _inputs(info):
        weight, bias = _weight_and_bias()
        opt = construct(info, [weight, bias], optim_input)
        seen: list[bool] = []
        watched = _watched(_closure(opt, weight, bias), seen)
        with torch.no_grad():
            loss = opt.step(watched)
        assert seen == [True] and isinstance(loss, torch.Tensor), optim_input.desc
        assert opt.state[weight]["step"] == 1, optim_input.desc


def _watched(closure: Closure, seen: list[bool]) -> Closure:
    """``closure``, noting in ``seen`` whether gradients were enabled each time it ran."""

    def watched() -> torch.Tensor:
        seen.append(torch.is_grad_enabled())
        return closure()

    return watched


def test_printing_names_the_class_and_every_group(info: OptimizerInfo) -> None:
    for optim_input in _inputs(info):
        opt = construct(info, list(_weight_and_bias()), optim_input)
        text = repr(opt)
        assert text.startswith(f"{info.name} (") and text.count("Parameter Group") == len(opt.param_groups)
        assert all(re.search(rf"\b{k}\b", text) for k in opt.param_groups[0] if k != "params"), optim_input.desc


# --------------------------------------------------------------------------------------- state dicts
def _run(info: OptimizerInfo, optim_input: OptimizerInput, steps: int, seed: int = 0) -> tuple:  # type: ignore[type-arg]
    weight, bias = _weight_and_bias(seed=seed)
    opt = construct(info, [weight, bias], optim_input)
    closure = _closure(opt, weight, bias)
    for _ in range(steps):
        opt.step(closure)
    return opt, weight, bias


def _continue_in_lockstep(a: tuple, b: tuple, steps: int, desc: str) -> None:  # type: ignore[type-arg]
    (opt_a, *params_a), (opt_b, *params_b) = a, b
    closures = [_closure(opt_a, *params_a), _closure(opt_b, *params_b)]
    for _ in range(steps):
        opt_a.step(closures[0])
        opt_b.step(closures[1])
        for x, y in zip(params_a, params_b, strict=True):
            assert torch.equal(x, y), f"{desc}: not in lockstep"


def test_state_dict_is_deterministic_and_loading_continues_in_lockstep(info: OptimizerInfo) -> None:
    """torch's ``test_state_dict_deterministic``: a loaded copy steps as the original, loading leaves the dict
    untouched, and equal (not identical) parameters give equal state dicts."""
    for optim_input in _inputs(info):
        first = _run(info, optim_input, 4)
        weight, bias = (p.detach().clone().requires_grad_() for p in first[1:])
        second = (construct(info, [weight, bias], optim_input), weight, bias)
        saved = copy.deepcopy(first[0].state_dict())
        given = copy.deepcopy(saved)
        second[0].load_state_dict(given)
        assert state_equal(given, saved), f"{optim_input.desc}: loading changed the dict it was given"
        _continue_in_lockstep(first, second, 4, optim_input.desc)
        assert state_equal(first[0].state_dict(), second[0].state_dict()), optim_input.desc


def test_weights_only_save_and_load_continue_in_lockstep(info: OptimizerInfo) -> None:
    for optim_input in _inputs(info):
        first = _run(info, optim_input, 4)
        buffer = io.BytesIO()
        torch.save(first[0].state_dict(), buffer)
        buffer.seek(0)
        weight, bias = (p.detach().clone().requires_grad_() for p in first[1:])
        second = (construct(info, [weight, bias], optim_input), weight, bias)
        second[0].load_state_dict(torch.load(buffer, weights_only=True))
        _continue_in_lockstep(first, second, 4, optim_input.desc)


def test_a_state_dict_from_before_the_engines_own_entries_loads(info: OptimizerInfo) -> None:
    """torch's ``test_can_load_older_state_dict``, for what we added over time: the ``gradproj`` entry (skipped
    steps, helpers' numbers), the per-matrix refresh counter and Adafactor's number ``lr``. Without them a dict
    loads and steps on in lockstep."""
    for optim_input in _inputs(info):
        first = _run(info, optim_input, 4)
        older = copy.deepcopy(first[0].state_dict())
        del older["gradproj"]
        for state in older["state"].values():
            state.pop("refreshes", None)
        for group in older["param_groups"] if info.name == "GaLoreAdafactor" else ():
            group["lr"] = None  # Adafactor's relative step kept no lr before it scaled the step by one
        weight, bias = (p.detach().clone().requires_grad_() for p in first[1:])
        second = (construct(info, [weight, bias], optim_input), weight, bias)
        second[0].load_state_dict(older)
        _continue_in_lockstep(first, second, 4, optim_input.desc)


# -------------------------------------------------------------------------------------------- copies
def _public(opt: torch.optim.Optimizer) -> set[str]:
    return {k for k in vars(opt) if not k.startswith("_")}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_steps_and_saves_exactly_as_the_original(info: OptimizerInfo, how: str) -> None:
    """torch's ``test_deepcopy_copies_all_public_attrs``, and more: the copy (with its own copies of the
    parameters) continues in lockstep with the original and saves the same state dict."""
    for optim_input in _inputs(info):
        original = _run(info, optim_input, 4)
        opt = original[0]
        opt.nonfinite_steps = 2  # a counter of the engine's own, not torch's
        clone = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
        assert _public(clone) == _public(opt), optim_input.desc
        weight, bias = (p for g in clone.param_groups for p in g["params"])  # the copy's own parameters
        assert weight is not original[1] and torch.equal(weight, original[1]), optim_input.desc
        _continue_in_lockstep(original, (clone, weight, bias), 4, optim_input.desc)
        saved, copied = opt.state_dict(), clone.state_dict()
        assert state_equal(saved, copied) and copied["gradproj"]["nonfinite_steps"] == 2, optim_input.desc


# --------------------------------------------------------------------------------------------- hooks
def test_step_hooks_run_in_order_and_see_the_optimizer(info: OptimizerInfo) -> None:
    """torch's ``test_step_all_hooks``: global pre, pre, (step), post, global post; removable handles."""
    optim_input = _inputs(info)[-1]
    weight, bias = _weight_and_bias()
    opt = construct(info, [weight, bias], optim_input)
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(f"pre {o is opt}")),
        opt.register_step_post_hook(lambda o, a, k: calls.append(f"post {o is opt}")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        _step_with(opt, [weight, bias], next(_grads([weight, bias], 1)))
    finally:
        for handle in handles:
            handle.remove()
    _step_with(opt, [weight, bias], next(_grads([weight, bias], 1)))
    assert calls == ["global pre", "pre True", "post True", "global post"]


def test_state_dict_hooks_shape_what_is_saved_and_loaded(info: OptimizerInfo) -> None:
    """The four state-dict hooks: pre sees the optimizer, post may add to the dict, load-pre may rewrite the
    dict before loading (here: halve every lr), load-post sees the loaded optimizer."""
    optim_input = _inputs(info)[-1]
    opt = _run(info, optim_input, 2)[0]
    calls: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def add(o: torch.optim.Optimizer, state: dict) -> dict:  # type: ignore[type-arg]
        return {**state, "note": "kept"}

    opt.register_state_dict_post_hook(add)
    saved = opt.state_dict()
    assert saved["note"] == "kept" and calls == ["pre"]
    other = construct(info, list(_weight_and_bias()), optim_input)

    def halve(o: torch.optim.Optimizer, state: dict) -> dict:  # type: ignore[type-arg]
        state = copy.deepcopy(state)
        state.pop("note")
        for group in state["param_groups"]:
            group["lr"] = group["lr"] / 2
        return state

    other.register_load_state_dict_pre_hook(halve)
    other.register_load_state_dict_post_hook(lambda o: calls.append(f"loaded {o.param_groups[0]['lr']}"))
    other.load_state_dict(saved)
    assert calls == ["pre", f"loaded {opt.param_groups[0]['lr'] / 2}"]


# -------------------------------------------------------------------------------------------- errors
def test_refusals_name_the_bad_value(info: OptimizerInfo) -> None:
    """torch's ``test_errors`` over torch's own error inputs for every optimizer and ours: construction errors
    (and the duplicate-parameter warning) with the words they must use, and a sparse gradient at ``step``."""
    for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params, kwargs = optim_input.params, optim_input.kwargs
        if params is None:  # torch's inputs leave the parameters to the test
            params = [torch.nn.Parameter(torch.randn(4, 3))]
        if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
            opt = info.optim_cls(params, **kwargs)
            for p in params:
                p.grad = torch.randn_like(p).to_sparse()
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                opt.step()
        elif issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                info.optim_cls(params, **kwargs)
