"""The built-in `broadcast` campaign type: one message to every matching lead, each from its owner device."""
