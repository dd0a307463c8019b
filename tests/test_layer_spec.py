"""The builder's choice of transformer-layer spec on a CUDA machine without Transformer Engine (issue 23, item 1).

megatron-core 0.16's ``gpt_layer_specs`` imports without TE but never defines ``TESpecProvider``, so asking it for
the TE spec raises ``NameError``. The builder must decide by whether ``transformer_engine`` itself imports. The
check runs in a subprocess so forcing ``torch.cuda.is_available`` and hiding TE touch no other test.
"""

import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch

    sys.modules["transformer_engine"] = None  # import transformer_engine raises ImportError, TE installed or not
    torch.cuda.is_available = lambda: True

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_logitavg.models.builder import _layer_spec

    def classes(spec):
        sub = spec.submodules
        out = [spec.module]
        for name in ("input_layernorm", "self_attention", "pre_mlp_layernorm", "mlp"):
            part = getattr(sub, name)
            out.append(getattr(part, "module", part))
        return out

    chosen = _layer_spec()
    expected = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert classes(chosen) == classes(expected), (classes(chosen), classes(expected))
    assert chosen.submodules.self_attention.submodules == expected.submodules.self_attention.submodules
    assert chosen.submodules.mlp.submodules == expected.submodules.mlp.submodules
    print("local spec")
    """
)


def test_cuda_without_transformer_engine_chooses_the_local_spec():
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("local spec")
