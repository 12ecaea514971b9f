"""The adversarial suite (issue 15): bad and unusual inputs through every door they apply to.

169 cases, 397 case x door runs (``test_count.py`` checks these figures against the tables):
images (formats, modes, bit depths, EXIF orientations, animation, sizes, lying headers, damaged
files, non-images; arrays and PIL images) through the Python API, ``segllm chat`` and the demo's
upload and ask handlers; dataset folders, released conversation files, chat scripts and
questions; checkpoints, pickled weights and training recipes. Each case states its outcome:
handled as an image viewer or the original code would, or one ``SegLLMError`` (one ``error:``
line from the CLI, one ``gr.Error`` in the demo) whose message names the problem. Every case
runs under a hang timeout and a memory bound (``conftest.py``); ``test_subprocess.py`` (slow)
checks a real terminal sees no traceback, ``test_faults.py`` (slow) kills training.
"""
