"""accounting is usable where torch is not installed."""

from __future__ import annotations

import subprocess
import sys


def test_accounting_imports_and_works_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import accounting as acc\n"
        "l = acc.Ledger(); l.record(acc.PoissonGaussian(0.01, 1.0), 100)\n"
        "ok = all(l.epsilon(1e-5, m) > 0 for m in acc.ACCOUNTANTS)\n"
        "print(ok, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]
