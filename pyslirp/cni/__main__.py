"""``python -m pyslirp.cni install DIR`` (the same as ``pyslirp cni install DIR``)."""

import sys

from pyslirp.cni.install import main

sys.exit(main())
