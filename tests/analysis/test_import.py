import subprocess
import sys


def test_import_is_light():
    code = ("import sys, torch, efficientml, efficientml.analysis; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialized'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
