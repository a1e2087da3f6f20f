"""Teacher pretraining's data: per-task sampling weights, seeded order, and what bad weights get."""

from collections import Counter

import datasets
import pytest
import torch

from pipeline.core.params import ParamsError, from_mapping
from pipeline.teacher.params import TeacherParams
from pipeline.teacher.pretraining import SequenceDataModule


def write_split(directory, tasks: list[str]):
    rows = {"task": tasks, "input_ids": [[i, i + 1] for i in range(len(tasks))],
            "attention_mask": [[1, 1]] * len(tasks)}
    datasets.Dataset.from_dict(rows).save_to_disk(str(directory / "train"))
    return directory


@pytest.fixture
def data_dir(tmp_path):
    # equal counts per task, as the built-in suite writes them
    return write_split(tmp_path, ["add", "sort", "perm", "word"] * 500)


def drawn_tasks(module: SequenceDataModule, tasks: list[str]) -> Counter:
    rows = torch.cat([batch["input_ids"][:, 0] for batch in module.train_dataloader()])
    return Counter(tasks[i] for i in rows.tolist())


def test_task_weights_set_each_task_share(data_dir):
    tasks = ["add", "sort", "perm", "word"] * 500
    weights = {"add": 4.0, "sort": 2.0, "perm": 2.0, "word": 0.0}
    counts = drawn_tasks(SequenceDataModule(data_dir, batch_size=50, task_weights=weights), tasks)
    assert sum(counts.values()) == 2000 and counts["word"] == 0  # an epoch is still len(train) rows
    assert abs(counts["add"] / 2000 - 0.5) < 0.05 and abs(counts["sort"] / 2000 - 0.25) < 0.05


def test_order_is_seeded(data_dir):
    def order(seed, weights=None):
        module = SequenceDataModule(data_dir, batch_size=100, task_weights=weights, seed=seed)
        return torch.cat([batch["input_ids"][:, 0] for batch in module.train_dataloader()])

    weights = {"add": 3.0, "sort": 1.0, "perm": 1.0, "word": 0.5}
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert torch.equal(order(0, weights), order(0, weights)) and not torch.equal(order(0, weights), order(1, weights))
    assert sorted(order(0).tolist()) == list(range(2000))  # unweighted: a permutation of every row


def test_weights_must_match_the_data(data_dir, tmp_path):
    module = SequenceDataModule(data_dir, batch_size=10, task_weights={"add": 1.0, "sort": 1.0, "mul": 1.0})
    with pytest.raises(ParamsError, match=r"task_weights.*no weight for the data's tasks \['perm', 'word'\]"):
        module.train_dataloader()
    external = tmp_path / "external"
    datasets.Dataset.from_dict({"input_ids": [[1, 2]] * 4, "attention_mask": [[1, 1]] * 4}).save_to_disk(
        str(external / "train"))
    zero = SequenceDataModule(data_dir, batch_size=10, task_weights={"add": 0.0, "sort": 0.0, "perm": 0.0,
                                                                     "word": 0.0, "mul": 1.0})
    with pytest.raises(ParamsError, match="every task in the data .* has weight 0"):
        zero.train_dataloader()
    with pytest.raises(ParamsError, match="no task column"):
        SequenceDataModule(external, batch_size=2, task_weights={"add": 1.0}).train_dataloader()


@pytest.mark.parametrize("weights, message", [({"add": -1.0}, r"task_weights.add: must be a finite number >= 0"),
                                              ({"add": float("inf")}, r"task_weights.add: must be a finite"),
                                              ({"add": "x"}, r"task_weights.add: must be a finite number"),
                                              ({"add": 0.0}, r"task_weights: needs a weight > 0")])
def test_bad_weights_are_named(weights, message):
    with pytest.raises(ParamsError, match=message):
        from_mapping(TeacherParams, {"train": {"task_weights": weights}}, "params.yaml:teacher")
