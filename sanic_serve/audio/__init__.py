"""Speech to text on the HTTP side (torch-free): decoding uploads to 16 kHz mono samples
(``decode``), Whisper's log-mel features (``features``), and the response formats built from the
decoder's tokens (``formats``)."""
