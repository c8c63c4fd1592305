-- The ownership chain of a package handed to another site (`dpsync package set
-- --source-site`): who owned it from which version, each link signed by the giver.
ALTER TABLE packages ADD COLUMN owner_chain TEXT;
