"""Work folders never silently mix runs: a folder is bound to its model (architecture and theta0's weights), task,
configuration and training set; damaged files are named, set aside and made again; a configuration is checked
before anything is written; a black-box fine-tune's id is stored before anything can fail."""

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.blackbox import BlackBoxDaunce
from daunce.store import CopyStore, task_fingerprint

CFG = DaunceConfig(n_models=4, optimizer="sgd", lr=0.5, steps=20, damping=1e-2, rho=0.3, isotropic_noise=False)
LOSS = ClassificationTask()


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(5, 3)


def data(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


TRAIN, QUERY = data(0), data(1, 6)


def daunce(model=None, task=LOSS, config=CFG, workdir=None, **kw):
    return Daunce(model if model is not None else linear(), task, config, workdir, progress=False,
                  trainer="sequential", **kw)


@pytest.fixture(scope="module")
def reference():
    """Scores of an undamaged in-memory run (sequential copies: the same in any folder)."""
    return daunce().fit(TRAIN).attribute(TRAIN, QUERY)


# ------------------------------------------------------------------------------ binding
def test_another_theta0_in_the_same_folder_is_refused(tmp_path, reference):
    torch.testing.assert_close(daunce(workdir=tmp_path).fit(TRAIN).attribute(TRAIN, QUERY), reference)
    with pytest.raises(ValueError, match=r"model weights \(theta0\) differ") as err:
        daunce(linear(42), workdir=tmp_path).fit(TRAIN)
    assert "architecture" not in str(err.value)  # the same shape: only the weights are named
    # a buffer is part of theta0 too
    m = linear()
    m.register_buffer("scale", torch.ones(3))
    with pytest.raises(ValueError, match="architecture differs"):
        daunce(m, workdir=tmp_path).fit(TRAIN)
    # the folder's own model still reuses every copy
    assert daunce(linear(0), workdir=tmp_path).fit(TRAIN).trained_copies == []


def test_another_architecture_in_the_same_folder_is_refused(tmp_path):
    daunce(workdir=tmp_path).fit(TRAIN)
    wrapped = nn.Sequential(linear())  # the same weights under other module names
    with pytest.raises(ValueError, match="architecture differs"):
        daunce(wrapped, workdir=tmp_path).fit(TRAIN)
    frozen = linear()
    frozen.bias.requires_grad_(False)  # another set of trainable tensors: another copy state
    with pytest.raises(ValueError, match="architecture differs"):
        daunce(frozen, workdir=tmp_path).fit(TRAIN)
    with pytest.raises(ValueError, match="architecture differs"):
        daunce(linear().double(), workdir=tmp_path).fit(TensorDataset(TRAIN.tensors[0].double(), TRAIN.tensors[1]))


def test_another_signal_in_the_same_folder_is_refused(tmp_path):
    daunce(workdir=tmp_path).fit(TRAIN)
    msg = r"task differs: ClassificationTask\(signal='loss'\) stored, ClassificationTask\(signal='margin'\) now"
    with pytest.raises(ValueError, match=msg):
        daunce(task=ClassificationTask("margin"), workdir=tmp_path).fit(TRAIN)
    # and an object that never fitted cannot read the folder's loss signals as margins either
    with pytest.raises(ValueError, match="task differs"):
        daunce(task=ClassificationTask("margin"), workdir=tmp_path).attribute(TRAIN, QUERY)


def test_a_user_task_is_fingerprinted_by_its_class_and_settings(tmp_path):
    class Tempered:
        def __init__(self, temperature):
            self.temperature, self.head, self._calls = temperature, nn.Identity(), 0

        def outputs(self, model, batch):
            self._calls += 1
            return model(batch[0]) / self.temperature

        def loss(self, outputs, batch):
            return nn.functional.cross_entropy(outputs, batch[1], reduction="none")

    assert task_fingerprint(Tempered(2.0)).endswith("Tempered(temperature=2.0)")  # no module, no private state
    daunce(task=Tempered(2.0), workdir=tmp_path).fit(TRAIN)
    assert daunce(task=Tempered(2.0), workdir=tmp_path).fit(TRAIN).trained_copies == []
    with pytest.raises(ValueError, match=r"task differs: .*Tempered\(temperature=2.0\) stored, .*Tempered\(temperature="
                                         r"3.0\) now"):
        daunce(task=Tempered(3.0), workdir=tmp_path).fit(TRAIN)


def test_a_folder_written_before_the_binding_is_bound_on_its_next_fit(tmp_path, reference):
    daunce(workdir=tmp_path).fit(TRAIN)
    path = tmp_path / "manifest.json"
    old = json.loads(path.read_text())
    for field in ("architecture", "model_weights", "task"):
        del old[field]
    path.write_text(json.dumps(old))
    with pytest.warns(RuntimeWarning, match=r"manifest.json was written before its \['architecture', 'model_weights', "
                                            r"'task'\] were recorded"):
        d = daunce(workdir=tmp_path).fit(TRAIN)
    assert d.trained_copies == [] and {"architecture", "model_weights", "task"} <= set(json.loads(path.read_text()))
    torch.testing.assert_close(d.attribute(TRAIN, QUERY), reference)
    with pytest.raises(ValueError, match=r"model weights \(theta0\) differ"):  # bound from now on
        daunce(linear(42), workdir=tmp_path).fit(TRAIN)


# ------------------------------------------------------------------------------ damaged files
def test_a_truncated_copy_file_is_named_and_retrained(tmp_path, reference):
    daunce(workdir=tmp_path).fit(TRAIN)
    path = tmp_path / "copies" / "copy_0002.pt"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.warns(RuntimeWarning, match=r"copy_0002\.pt is damaged \(unreadable: .*moved to "
                                            r"copy_0002\.pt\.damaged"):
        d = daunce(workdir=tmp_path).fit(TRAIN)
    assert d.trained_copies == [2]
    assert (tmp_path / "copies" / "copy_0002.pt.damaged").read_bytes() == raw[: len(raw) // 2]
    torch.testing.assert_close(d.attribute(TRAIN, QUERY), reference, rtol=0, atol=1e-7)


def test_a_copy_file_holding_another_copys_record_is_detected(tmp_path, reference):
    daunce(workdir=tmp_path).fit(TRAIN)
    copies = tmp_path / "copies"
    shutil.copy(copies / "copy_0001.pt", copies / "copy_0003.pt")
    # read directly, the file is refused with its name
    with pytest.raises(RuntimeError, match=r"copy 3: .*copy_0003\.pt is damaged \(it holds the record of copy 1, not "
                                           r"of copy 3\)"):
        CopyStore(tmp_path).load(3)
    # an object that has not fitted finds the copy missing (and says which file it set aside) ...
    with pytest.warns(RuntimeWarning, match=r"copy_0003\.pt is damaged \(it holds the record of copy 1"):
        with pytest.raises(RuntimeError, match=r"copies \[3\] are not trained"):
            daunce(workdir=tmp_path).attribute(TRAIN, QUERY)
    # ... and fit trains it again: the scores of an undamaged run
    d = daunce(workdir=tmp_path).fit(TRAIN)
    assert d.trained_copies == [3]
    torch.testing.assert_close(d.attribute(TRAIN, QUERY), reference, rtol=0, atol=1e-7)


def test_a_copy_of_other_shapes_is_detected(tmp_path):
    daunce(workdir=tmp_path).fit(TRAIN)
    path = tmp_path / "copies" / "copy_0000.pt"
    rec = torch.load(path, weights_only=True)
    rec["state"] = [rec["state"][0][:2], rec["state"][1]]
    torch.save(rec, path)
    with pytest.warns(RuntimeWarning, match=r"copy_0000\.pt is damaged \(its state has shapes \[\(2, 5\), \(3,\)\]"):
        assert daunce(workdir=tmp_path).fit(TRAIN).trained_copies == [0]


def test_a_damaged_manifest_is_an_error_naming_the_file(tmp_path):
    daunce(workdir=tmp_path).fit(TRAIN)
    path = tmp_path / "manifest.json"
    path.write_text(path.read_text()[:25])
    for call in (lambda d: d.fit(TRAIN), lambda d: d.attribute(TRAIN, QUERY)):
        with pytest.raises(ValueError, match=rf"{path} is damaged \(JSONDecodeError.*delete {tmp_path}"):
            call(daunce(workdir=tmp_path))
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{path} is damaged \(it holds a list"):
        daunce(workdir=tmp_path).fit(TRAIN)


def test_a_damaged_signals_file_is_computed_again(tmp_path):
    d = daunce(workdir=tmp_path).fit(TRAIN)
    S = d.signals(QUERY)  # not recorded during fit: computed from the weights and stored
    (path,) = (tmp_path / "signals").glob("*.pt")
    path.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match=rf"{path.name} is damaged \(unreadable"):
        again = daunce(workdir=tmp_path).signals(QUERY)
    torch.testing.assert_close(again, S, rtol=0, atol=0)
    assert path.with_name(path.name + ".damaged").exists()
    assert set(torch.load(path, weights_only=True)) == {0, 1, 2, 3}  # stored again


# ------------------------------------------------------------------------------ training sets
def test_fit_on_a_new_training_set_refits_in_memory(monkeypatch):
    from daunce import auto

    resolved_on = []

    def rule(ctx, config, train):  # a stand-in for the "auto" rule (seconds): its values depend on the set
        resolved_on.append(len(train))
        values = dict(rho=0.3, damping=1e-3 * len(train), isotropic_noise=False)
        return config.static().replace(**values), {"resolved": values}

    monkeypatch.setattr(auto, "resolve", rule)
    cfg = DaunceConfig(n_models=4, steps=20)  # rho, damping, isotropic_noise: "auto"
    train2 = data(7, n=30)
    d = daunce(config=cfg).fit(TRAIN)
    d.fit(train2)
    assert resolved_on == [40, 30] and d.resolved_config.damping == pytest.approx(0.03)  # resolved on the new set
    fresh = daunce(config=cfg).fit(train2)
    assert d.trained_copies == [0, 1, 2, 3] and d.n_train == 30 and d.train_fingerprint == fresh.train_fingerprint
    torch.testing.assert_close(d.attribute(train2, QUERY), fresh.attribute(train2, QUERY), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"attribute: train_dataset \(40 examples, fingerprint [0-9a-f]{16}\) is not "
                                         r"the training set the copies were fitted on \(30 examples"):
        d.attribute(TRAIN, QUERY)


def test_fit_on_a_new_training_set_with_a_workdir_is_refused(tmp_path):
    d = daunce(workdir=tmp_path).fit(TRAIN)
    with pytest.raises(ValueError, match=rf"{tmp_path} holds copies fitted on another training set \(40 examples"):
        d.fit(data(7))
    with pytest.raises(ValueError, match="training set differs: [0-9a-f]{16} stored, [0-9a-f]{16} now"):
        daunce(workdir=tmp_path).fit(data(7))  # a new object: the manifest names it
    # attribute with another training set: refused by this object and by one that never fitted
    for obj in (d, daunce(workdir=tmp_path)):
        with pytest.raises(ValueError, match="is not the training set the copies were fitted on"):
            obj.attribute(data(7), QUERY)
    assert daunce(workdir=tmp_path).attribute(TRAIN, QUERY).shape == (40, 6)


# ------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("field,value", [
    ("seed", 1.5), ("seed", True), ("subset_ratio", "0.5"), ("subset_ratio", True), ("steps", True),
    ("n_models", True), ("n_models", 4.0), ("epochs", 2.0), ("batch_size", True), ("max_steps", True),
    ("train_mode", 1), ("tol", "0.05"), ("rho", True), ("damping", True), ("lr", "1e-2"), ("momentum", True),
    ("isotropic_noise", 1), ("variant", None), ("score", ["cov"]), ("gamma", float("inf")),
])
def test_a_bad_configuration_is_refused_before_anything_is_written(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"DaunceConfig: {field}\b.*got (the string )?{re.escape(repr(value))}"):
        daunce(config=DaunceConfig(**{field: value}), workdir=tmp_path / "run").fit(TRAIN)
    assert not (tmp_path / "run").exists()


def test_numpy_numbers_are_plain_numbers_in_a_configuration(tmp_path):
    cfg = DaunceConfig(n_models=np.int64(4), seed=np.int64(0), rho=np.float32(0.5), optimizer="sgd", lr=0.5,
                       steps=20, damping=1e-2, isotropic_noise=False)
    assert type(cfg.n_models) is int and type(cfg.seed) is int and type(cfg.rho) is float
    daunce(config=cfg.replace(rho=0.5), workdir=tmp_path).fit(TRAIN)
    assert daunce(config=cfg, workdir=tmp_path).fit(TRAIN).trained_copies == []  # the same manifest


# ------------------------------------------------------------------------------ black box
class Memoriser:
    """A fake backend: a model's log-likelihood of an example grows with whether it was trained on."""

    def __init__(self, ids=None):
        self.models, self.calls, self.ids = {}, 0, ids or {}

    def fine_tune(self, examples, seed):
        self.calls += 1
        mid = self.ids.get(self.calls, f"m{self.calls}")
        self.models[str(mid)] = {e["prompt"] for e in examples}
        return mid

    def log_likelihoods(self, model_id, examples):
        seen = self.models[str(model_id)]
        return np.array([-3.0 + (e["prompt"] in seen) + 0.1 * len(e["prompt"]) for e in examples])


class JobMemoriser(Memoriser):
    """The same model behind server jobs (``start_fine_tune`` / ``wait_fine_tune``)."""

    def __init__(self, jobs=None):
        super().__init__()
        self.jobs, self.started, self.job_ids = {}, 0, jobs or {}

    def start_fine_tune(self, examples, seed):
        self.started += 1
        job = self.job_ids.get(self.started, f"job{self.started}")
        self.jobs[str(job)] = examples
        return job

    def wait_fine_tune(self, job_id):
        return self.fine_tune(self.jobs[str(job_id)], 0)


EX = [{"prompt": f"p{i}", "response": "r"} for i in range(12)]
QEX = [{"prompt": "p1", "response": "r"}, {"prompt": "q", "response": "r"}]


def test_a_non_json_model_id_is_saved_before_the_error_and_never_paid_again(tmp_path):
    b = Memoriser(ids={2: object()})  # the second fine-tune returns an id JSON cannot hold
    with pytest.raises(TypeError, match=r"backend\.fine_tune returned a object id for fine-tune 1 .*saved in "
                                        r".*copy_0001\.json \('model_id_unstorable'\)"):
        BlackBoxDaunce(b, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert b.calls == 2
    rec = json.loads((tmp_path / "copies" / "copy_0001.json").read_text())
    assert rec["model_id_unstorable"].startswith("<object object at") and "model_id" not in rec
    again = Memoriser()
    with pytest.raises(RuntimeError, match=r"fine-tune 1 was started but .*would pay twice"):
        BlackBoxDaunce(again, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert again.calls == 0  # copy 0 was finished, copy 1 is refused: nothing paid


def test_a_non_json_job_id_is_saved_before_the_error_and_never_started_again(tmp_path):
    b = JobMemoriser(jobs={1: np.int64(7), 2: {"job": 2}})  # a numpy integer is stored as an int; a dict is not
    with pytest.raises(TypeError, match=r"backend\.start_fine_tune returned a dict id for fine-tune 1"):
        BlackBoxDaunce(b, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    recs = [json.loads((tmp_path / "copies" / f"copy_000{k}.json").read_text()) for k in range(2)]
    assert recs[0]["job_id"] == 7 and recs[1]["job_id_unstorable"] == "{'job': 2}"
    rerun = JobMemoriser()
    rerun.jobs = b.jobs  # the server still knows the jobs
    with pytest.raises(RuntimeError, match="fine-tune 1 was started"):
        BlackBoxDaunce(rerun, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert rerun.started == 0
    # the id written by hand into the record: the run goes on without starting that job again
    path = tmp_path / "copies" / "copy_0001.json"
    rec = json.loads(path.read_text())
    del rec["job_id_unstorable"]
    rec["job_id"] = "{'job': 2}"
    path.write_text(json.dumps(rec))
    d = BlackBoxDaunce(rerun, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert rerun.started == 1 and d.fine_tunes_started == 1  # copy 2 only


def test_black_box_fit_on_a_new_training_set_and_attribute(tmp_path):
    b = Memoriser()
    d = BlackBoxDaunce(b, n_models=4, progress=False, signal="sum").fit(EX)
    d.fit(EX[:10])
    assert b.calls == 8  # in memory: the fine-tunes of the first set are dropped
    fresh = BlackBoxDaunce(Memoriser(), n_models=4, progress=False, signal="sum").fit(EX[:10])
    torch.testing.assert_close(d.attribute(EX[:10], QEX), fresh.attribute(EX[:10], QEX))
    with pytest.raises(ValueError, match=r"attribute: train \(12 examples, fingerprint [0-9a-f]{16}\) is not the "
                                         r"training set the fine-tunes were made on \(10 examples"):
        d.attribute(EX, QEX)
    w = BlackBoxDaunce(b, n_models=4, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    with pytest.raises(ValueError, match=rf"{tmp_path} holds fine-tunes of another training set"):
        w.fit(EX[:10])
    with pytest.raises(ValueError, match="is not the training set the fine-tunes were made on"):
        BlackBoxDaunce(b, n_models=4, workdir=tmp_path, progress=False, signal="sum").attribute(EX[:10], QEX)


def test_black_box_folder_is_bound_to_the_backend_and_model_name(tmp_path):
    class Named(Memoriser):
        def __init__(self, name):
            super().__init__()
            self.base_model = name

        def identity(self):
            return "named-memoriser"

    BlackBoxDaunce(Named("small"), n_models=2, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert json.loads((tmp_path / "manifest.json").read_text())["model_name"] == "small"
    with pytest.raises(ValueError, match="model name differs: small stored, large now"):
        BlackBoxDaunce(Named("large"), n_models=2, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    with pytest.raises(ValueError, match="backend differs: named-memoriser stored, Memoriser now"):
        BlackBoxDaunce(Memoriser(), n_models=2, workdir=tmp_path, progress=False, signal="sum").attribute(EX, QEX)


def test_a_damaged_black_box_record_is_set_aside_and_made_again(tmp_path):
    b = Memoriser()
    ref = BlackBoxDaunce(b, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX).attribute(EX, QEX)
    path = tmp_path / "copies" / "copy_0002.json"
    path.write_text(path.read_text()[:40])
    with pytest.warns(RuntimeWarning, match=r"copy_0002\.json is damaged \(unreadable: JSONDecodeError"):
        d = BlackBoxDaunce(b, n_models=3, workdir=tmp_path, progress=False, signal="sum").fit(EX)
    assert d.fine_tunes_started == 1 and path.with_name("copy_0002.json.damaged").exists()
    torch.testing.assert_close(d.attribute(EX, QEX), ref)  # the fake backend's fine-tunes are deterministic


@pytest.mark.parametrize("option,value", [("seed", 1.5), ("n_models", True), ("subset_ratio", "0.5"),
                                          ("subset_ratio", True), ("seed", "0"), ("progress", "no")])
def test_bad_black_box_options_are_refused_before_anything_is_written(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"{option}\b.* must be .*got {re.escape(repr(value))}"):
        BlackBoxDaunce(Memoriser(), **{"n_models": 2, "signal": "sum", "progress": False, option: value},
                       workdir=tmp_path / "run").fit(EX)
    assert not (tmp_path / "run").exists()


def test_no_warning_on_a_clean_rerun(tmp_path):
    daunce(workdir=tmp_path).fit(TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert daunce(workdir=tmp_path).fit(TRAIN).trained_copies == []
