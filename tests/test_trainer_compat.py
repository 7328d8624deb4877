"""TrainingArguments through `compat`: today's names work on the installed release, and a name it
takes under no spelling is `Unsupported` with the reason, not a crash deep in the Trainer."""
import pytest

from numerics.versions import compat


def test_todays_names_build_arguments(tmp_path) -> None:
    arguments = compat.training_arguments(output_dir=str(tmp_path), use_cpu=True, eval_strategy="no", report_to=[])
    assert arguments.per_device_train_batch_size == 8


def test_an_argument_no_release_spelling_takes_is_unsupported(tmp_path) -> None:
    with pytest.raises(compat.Unsupported, match="TrainingArguments takes no 'gradient_surgery'"):
        compat.training_arguments(output_dir=str(tmp_path), gradient_surgery=True)
