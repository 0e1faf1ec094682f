"""A tiny ledger aggregate used to test the store and the aggregate repository."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from runtime.store import Decider


class Opened(msgspec.Struct, frozen=True, tag=True):
    owner: str


class Deposited(msgspec.Struct, frozen=True, tag=True):
    amount: int
    note: str = ""


class Withdrawn(msgspec.Struct, frozen=True, tag=True):
    amount: int


class Renamed(msgspec.Struct, frozen=True, tag=True):
    """Schema version 3: ``owner`` was ``name`` in v1 and ``holder`` in v2."""

    owner: str
    schema_version: ClassVar[int] = 3


LedgerEvent = Opened | Deposited | Withdrawn | Renamed


class Open(msgspec.Struct, frozen=True):
    owner: str


class Deposit(msgspec.Struct, frozen=True):
    amount: int


class Withdraw(msgspec.Struct, frozen=True):
    amount: int


LedgerCommand = Open | Deposit | Withdraw


class Ledger(msgspec.Struct, frozen=True):
    owner: str | None = None
    balance: int = 0
    operations: int = 0


class LedgerError(Exception):
    pass


def decide(command: LedgerCommand, state: Ledger) -> list[LedgerEvent]:
    match command:
        case Open(owner=owner):
            if state.owner is not None:
                raise LedgerError("already open")
            return [Opened(owner)]
        case Deposit(amount=amount):
            if state.owner is None or amount <= 0:
                raise LedgerError("cannot deposit")
            return [Deposited(amount)]
        case Withdraw(amount=amount):
            if state.owner is None or amount <= 0 or amount > state.balance:
                raise LedgerError("cannot withdraw")
            return [Withdrawn(amount)]


def evolve(state: Ledger, event: LedgerEvent) -> Ledger:
    match event:
        case Opened(owner=owner) | Renamed(owner=owner):
            return msgspec.structs.replace(state, owner=owner, operations=state.operations + 1)
        case Deposited(amount=amount):
            return msgspec.structs.replace(
                state, balance=state.balance + amount, operations=state.operations + 1
            )
        case Withdrawn(amount=amount):
            return msgspec.structs.replace(
                state, balance=state.balance - amount, operations=state.operations + 1
            )


LEDGER: Decider[LedgerCommand, LedgerEvent, Ledger] = Decider(
    aggregate_type="ledger",
    initial_state=Ledger(),
    decide=decide,
    evolve=evolve,
    state_type=Ledger,
)
