"""Front doors to the :class:`~sparsefw.Sparsifier` from other training frameworks, each an
optional extra: :mod:`sparsefw.integrations.huggingface` (``pip install sparsefw[huggingface]``)
and :mod:`sparsefw.integrations.lightning` (``pip install sparsefw[lightning]``). They map each
framework's events onto the Sparsifier's halves (``begin_step``, ``post_backward``,
``after_step``) and never re-implement a piece of the lifecycle."""
