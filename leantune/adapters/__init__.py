"""Adapters on disk: leantune's own format, the Hugging Face PEFT format both ways, and merged export.

Above the API: these modules attach and detach through `leantune.api`; nothing below imports them.
"""
from .merged import save_merged_model
from .native import attach_with_state, load_adapter, read_adapter_config, save_adapter
from .peft_export import export_peft
from .peft_import import import_peft

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "attach_with_state", "save_merged_model",
           "export_peft", "import_peft"]
