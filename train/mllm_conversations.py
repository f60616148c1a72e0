"""Moved to :mod:`train.mllm.conversations`; this module only re-exports it, so that
``python -m train.mllm_conversations`` and imports from ``train.mllm_conversations`` keep working."""

import sys

from train.mllm.conversations import (
    ROLES,
    TASKS,
    ConversationRecord,
    ConversionReport,
    conversation_read_report,
    conversations_from_record,
    conversations_from_records,
    main,
    parse_conversation,
    read_conversations,
    write_conversations,
)

__all__ = [
    "ROLES",
    "TASKS",
    "ConversationRecord",
    "ConversionReport",
    "conversation_read_report",
    "conversations_from_record",
    "conversations_from_records",
    "main",
    "parse_conversation",
    "read_conversations",
    "write_conversations",
]

if __name__ == "__main__":
    sys.exit(main())
