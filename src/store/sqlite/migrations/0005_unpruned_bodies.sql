-- Retention drops bodies before the rows that describe them, oldest first. Without this index
-- each batch of body pruning walked past every row whose body had gone already (days of rows
-- with the default settings) to find the next ones to drop.
CREATE INDEX deliveries_unpruned_bodies ON deliveries (seq) WHERE body_pruned = 0;
