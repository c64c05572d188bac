-- Verdicts that left no handler to run: with the closings, they are the records that say a
-- delivery's work is done, and retention walks them instead of working out every kept
-- delivery's status (stale, dead and unrecognized ones are kept far longer than delivered ones,
-- and a walk over them all at every run of the pruner cost more than the pruning).
CREATE INDEX verdicts_settled ON verdicts (seq) WHERE handlers = '[]';
