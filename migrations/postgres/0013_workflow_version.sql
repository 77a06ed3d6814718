-- The version of the persisted encoding (input, states, events) of the build that created
-- each workflow (`Machine::VERSION`). Workflows from before versions existed are version 1,
-- the encoding of that release. A build drives only the versions it reads; it leaves the
-- others untouched, for a worker of their version (see docs/upgrading.md).
ALTER TABLE workflows ADD COLUMN version BIGINT NOT NULL DEFAULT 1;
