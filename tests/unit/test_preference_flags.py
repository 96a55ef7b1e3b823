"""The DPO flags: ms-swift names and defaults, the guide's --dpo_loss_type spelling, refusals."""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import pytest

from mvlm.train.preference_flags import DPO_LOSS_TYPES, add_dpo_args, dpo_loss_config


def _parse(argv):
    p = argparse.ArgumentParser()
    add_dpo_args(p)
    return p.parse_args(argv)


def test_guide_dpo_flags_map_to_the_loss_config(caplog):
    # the guide's §5.5 script: --beta 0.1 --label_smoothing 0.01 --dpo_loss_type sigmoid
    guide = ["--beta", "0.1", "--label_smoothing", "0.01", "--dpo_loss_type", "sigmoid"]
    with caplog.at_level(logging.INFO, logger="mvlm.train"):
        cfg = dpo_loss_config(_parse(guide))
    assert cfg.loss_type == ("sigmoid",) and cfg.beta == 0.1 and cfg.label_smoothing == 0.01
    assert "--dpo_loss_type sigmoid -> --loss_type sigmoid" in caplog.text
    notes: list[str] = []
    dpo_loss_config(_parse(guide), notes)  # a run collects the line with its other notes
    assert notes == ["--dpo_loss_type sigmoid -> --loss_type sigmoid (current name)"]
    d = dpo_loss_config(_parse([]))  # ms-swift defaults
    assert (d.beta, d.loss_type, d.label_smoothing, d.rpo_alpha, d.reference_free) == \
        (0.1, ("sigmoid",), 0.0, None, False)
    m = dpo_loss_config(_parse(["--loss_type", "sigmoid", "bco_pair", "sft", "--loss_weights",
                                "0.8", "0.2", "1.0", "--rpo_alpha", "0.5", "--reference_free"]))
    assert m.loss_type == ("sigmoid", "bco_pair", "sft") and m.loss_weights == (0.8, 0.2, 1.0)
    assert m.rpo_alpha == 0.5 and m.reference_free


def test_bad_dpo_flags_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="not a DPO loss type; choose from sigmoid, hinge"):
        dpo_loss_config(_parse(["--loss_type", "dpo"]))
    with pytest.raises(ValueError, match="disagree"):
        dpo_loss_config(_parse(["--loss_type", "ipo", "--dpo_loss_type", "sigmoid"]))
    with pytest.raises(ValueError, match="one weight per loss type"):
        dpo_loss_config(_parse(["--loss_type", "sigmoid", "sft", "--loss_weights", "1"]))


def test_help_lists_every_loss_type_without_importing_torch():
    p = argparse.ArgumentParser()
    add_dpo_args(p)
    text = " ".join(p.format_help().split())
    assert all(t in text for t in DPO_LOSS_TYPES)
    out = subprocess.run([sys.executable, "-c", "import sys, mvlm.train.preference_flags; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_cpo_simpo_orpo_kto_settings_follow_ms_swift():
    from mvlm.train.preference_flags import cpo_loss_config, kto_loss_config, orpo_beta
    from mvlm.train.rlhf import method_parser, split_argv

    def ns(argv):
        return method_parser().parse_known_args(argv)[0]

    s = cpo_loss_config(ns([]), "simpo")  # ms-swift: simpo = cpo + loss_type simpo, beta 2.0
    assert (s.loss_type, s.beta, s.simpo_gamma, s.cpo_alpha) == ("simpo", 2.0, 1.0, 1.0)
    c = cpo_loss_config(ns(["--cpo_alpha", "0"]), "cpo")
    assert (c.loss_type, c.beta, c.cpo_alpha) == ("sigmoid", 0.1, 0.0)
    assert orpo_beta(ns([])) == 0.1 and orpo_beta(ns(["--beta", "0.3"])) == 0.3
    with pytest.raises(ValueError, match="--rpo_alpha has no effect with --rlhf_type cpo"):
        cpo_loss_config(ns(["--rpo_alpha", "1"]), "cpo")
    with pytest.raises(ValueError, match="--label_smoothing has no effect with --rlhf_type orpo"):
        orpo_beta(ns(["--label_smoothing", "0.1"]))
    with pytest.raises(ValueError, match="--simpo_gamma has no effect with --rlhf_type dpo"):
        dpo_loss_config(ns(["--simpo_gamma", "0.5"]))
    with pytest.raises(ValueError, match="CPO --loss_type 'bco_pair' is unknown"):
        cpo_loss_config(ns(["--loss_type", "bco_pair"]), "cpo")
    with pytest.raises(ValueError, match="mvlm rlhf runs cpo, dpo, kto, orpo, rm, simpo and grpo"):
        split_argv(["--rlhf_type", "ppo"])
    k = kto_loss_config(ns(["--desirable_weight", "1.5", "--undesirable_weight", "0.5"]))
    assert (k.loss_type, k.beta, k.desirable_weight, k.undesirable_weight) == \
        ("kto", 0.1, 1.5, 0.5)
    assert kto_loss_config(ns(["--loss_type", "apo_zero_unpaired"])).uses_kl is False
    with pytest.raises(ValueError, match="KTO --loss_type 'sigmoid' is unknown"):
        kto_loss_config(ns(["--loss_type", "sigmoid"]))
    with pytest.raises(ValueError, match="--label_smoothing has no effect with --rlhf_type kto"):
        kto_loss_config(ns(["--label_smoothing", "0.1"]))
    with pytest.raises(ValueError, match="--desirable_weight has no effect with --rlhf_type dpo"):
        dpo_loss_config(ns(["--desirable_weight", "2"]))
    with pytest.raises(ValueError, match="--undesirable_weight must be >= 0"):
        kto_loss_config(ns(["--undesirable_weight", "-1"]))
    from mvlm.train.preference_flags import rm_center_coefficient

    assert rm_center_coefficient(ns([])) is None
    assert rm_center_coefficient(ns(["--center_rewards_coefficient", "0.01"])) == 0.01
    with pytest.raises(ValueError, match="--beta has no effect with --rlhf_type rm"):
        rm_center_coefficient(ns(["--beta", "0.2"]))
    with pytest.raises(ValueError, match="--ref_model has no effect with --rlhf_type rm"):
        rm_center_coefficient(ns(["--ref_model", "x"]))
    with pytest.raises(ValueError, match="--precompute_ref_log_probs has no effect with "
                       "--rlhf_type cpo"):
        cpo_loss_config(ns(["--precompute_ref_log_probs", "true"]), "cpo")
    with pytest.raises(ValueError, match="--precompute_ref_log_probs with --reference_free"):
        dpo_loss_config(ns(["--precompute_ref_log_probs", "--reference_free", "true"]))
    assert dpo_loss_config(ns(["--precompute_ref_log_probs"])).reference_free is False
    m, _ = split_argv(["--rlhf_type", "rm"])
    assert m.rlhf_type == "rm"
    m, rest = split_argv(["--rlhf_type", "simpo", "--beta", "2.5", "--model", "M", "--lr", "1"])
    assert m.rlhf_type == "simpo" and m.beta == 2.5 and rest == ["--model", "M", "--lr", "1"]
