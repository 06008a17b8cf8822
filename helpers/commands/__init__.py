"""Command-line tools; notebooks never import this package.

* ``python -m helpers.commands.reference_run`` -- execute the solution notebooks, check and report the run;
* ``python -m helpers.commands.train_small_model`` -- train the shipped small teacher (digits-sd);
* ``python -m helpers.commands.train_classifier`` -- train the digit classifier behind ``prompt_accuracy``;
* ``python -m helpers.commands.sd15_shaped`` -- write an SD1.5-shaped random-weight pipeline and a generated
  image-caption folder (the SD1.5 path without weights);
* ``python -m helpers.commands.lab`` -- JupyterLab for a student (``make lab``);
* ``python -m helpers.commands.collect`` -- a student's hand-in zip, laid out as nbgrader's ``submitted/``.

What the notebooks import lives in :mod:`helpers` itself. The student bundle (``python -m autograder bundle``)
carries only ``collect`` (``python -m helpers.commands.collect``: the hand-in zip); the others stay with the kit.
"""
