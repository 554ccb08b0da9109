"""The byte-token encoding every text job shares, and the server reproduces from the model's config parameters
(text_offset, text_pad_id): token = UTF-8 byte + TOKEN_OFFSET, PAD_ID pads, so the vocabulary is 256 bytes plus
padding. Defined once: an embedding sized from one number and an encoder shifted by another would drift apart."""

from __future__ import annotations

TOKEN_OFFSET = 1  # token = byte + 1
PAD_ID = 0
VOCAB_SIZE = 256 + TOKEN_OFFSET  # 257: every byte value plus the padding token
