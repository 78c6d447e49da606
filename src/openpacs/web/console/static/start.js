/* Loaded last: every page script has registered itself by now. */
OP.start();
